import os
import stat

import pytest

from esspr_jax.atomic_io import atomic_open, atomic_write


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = tmp_path / "out" / "table.csv"
  atomic_write(path, "old\n")
  with pytest.raises(RuntimeError):
    with atomic_open(path, "w", encoding="utf-8") as f:
      f.write("half of the new")
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "old\n"
  assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]


def test_successful_write_replaces_whole_file(tmp_path):
  path = tmp_path / "t.bin"
  atomic_write(path, b"\x00\x01")
  with atomic_open(path, "w", encoding="utf-8") as f:
    f.write("new")
  assert path.read_text() == "new"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["022", "002", "077"])
def test_written_files_get_the_mode_a_plain_open_gives_under_the_umask(tmp_path, umask, mode):
  """A search service running as another user must be able to read manifest.json:
  files are 0666 & ~umask, as open() makes them, not mkstemp's 0600."""
  old = os.umask(umask)
  try:
    atomic_write(tmp_path / "manifest.json", "{}")
    with atomic_open(tmp_path / "table.csv", "w", encoding="utf-8") as f:
      f.write("a\n")
    with open(tmp_path / "plain.txt", "w", encoding="utf-8") as f:
      f.write("a\n")
  finally:
    os.umask(old)
  for name in ("manifest.json", "table.csv", "plain.txt"):
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
