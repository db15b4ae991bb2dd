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
