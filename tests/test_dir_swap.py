"""dir_swap.swap_in: a finished directory replaces another whole (an atomic exchange on
Linux, two renames where the system has none), or lands where nothing was."""
import pytest

from esspr_jax import dir_swap


def _dir(path, **files):
  path.mkdir()
  for name, text in files.items():
    (path / name).write_text(text)
  return path


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_in_replaces_the_old_directory_whole(tmp_path, monkeypatch, exchange):
  if not exchange:
    monkeypatch.setattr(dir_swap, "_EXCHANGE", None)  # a system without renameat2
  else:
    assert dir_swap._EXCHANGE is not None
  final = _dir(tmp_path / "final", a="old", b="old")
  dir_swap.swap_in(_dir(tmp_path / "new", a="new"), final)
  assert {p.name: p.read_text() for p in final.iterdir()} == {"a": "new"}
  assert [p.name for p in tmp_path.iterdir()] == ["final"]
  dir_swap.swap_in(_dir(tmp_path / "new2", c="x"), tmp_path / "fresh" / "final")
  assert (tmp_path / "fresh" / "final" / "c").read_text() == "x"
