"""Every repo path a docstring, comment or doc cites exists: docs never point at moved files."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
CITED = re.compile(r"(?<![\w/.~-])((?:esspr_jax|docs|configs|benchmarks|launch|tests)/[\w/.-]*\w)")
# Paths that name something a run writes, not a file of the repo.
GENERATED = ("runs/", "tests/.", "docs/_")


def _sources():
  for pattern in ("esspr_jax/**/*.py", "configs/*.py", "benchmarks/*.py", "launch/*",
                  "docs/*.md", "README.md"):
    yield from (p for p in REPO.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)


def _exists(ref: str) -> bool:
  path = REPO / ref.rstrip(".")
  if path.exists():
    return True
  # `esspr_jax/models/pretrained/` or a glob-ish stem like `configs/finetune_*`.
  return "*" in ref or any(REPO.glob(ref.rstrip(".") + "*"))


def test_every_cited_path_exists():
  missing = sorted({f"{src.relative_to(REPO)}: {ref}" for src in _sources()
                    for ref in CITED.findall(src.read_text(encoding="utf-8"))
                    if not ref.startswith(GENERATED) and not _exists(ref)})
  assert not missing, "\n".join(missing)
