"""CI runs the linter: pyproject.toml's [tool.ruff] rules hold over the whole tree, so a
`noqa: PLC0415` means an import deliberately kept inside a function."""
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                          capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
