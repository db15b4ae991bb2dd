"""The pairs builder's inputs (esspr_jax/input/esspr_tfds.py): empty pair files are one
clear error, a changed image dir is a changed dataset, unusable image paths are counted."""
import io
import logging
import os
import pathlib
import signal

import pytest
from PIL import Image

from esspr_jax.input import esspr_tfds
from esspr_jax.errors import DataError

HEADER = "cate_lv1_name,cate_name,trigger_id,trigger_title,recall_id,recall_title,trigger_img,recall_img,label\n"


def _jpeg(path, color):
  buf = io.BytesIO()
  Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
  path.write_bytes(buf.getvalue())


@pytest.fixture
def image_dirs(tmp_path):
  """Two image dirs with the same file names and different pictures."""
  dirs = []
  for n, color in enumerate([(200, 0, 0), (0, 0, 200)]):
    d = tmp_path / f"images_{n}"
    d.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
      _jpeg(d / name, color)
    dirs.append(d)
  return dirs


@pytest.mark.parametrize("rows, reason", [
    ("", "it has a header but no rows"),
    ("X,Y,a,t a,b,t b,a.jpg,b.jpg,0\nX,Y,a,t a,c,t c,a.jpg,c.jpg,0\n",
     "all 2 readable rows have label 0"),
])
def test_a_pair_file_without_a_positive_is_one_clear_error(tmp_path, image_dirs, rows, reason):
  csv = tmp_path / "pairs.csv"
  csv.write_text(HEADER + rows)
  with pytest.raises(DataError) as info:
    esspr_tfds.build_pairs_dataset(csv, image_dirs[0], tmp_path / "tfds", "pairs")
  message = str(info.value)
  assert message.startswith(f"{csv}: no pairs to build: ") and reason in message
  assert "\n" not in message
  assert not (tmp_path / "tfds" / esspr_tfds.BUILDER_NAME / "pairs" / "1.0.0").exists()


def test_the_same_csv_with_another_image_dir_is_rebuilt(tmp_path, image_dirs, caplog):
  csv = tmp_path / "pairs.csv"
  csv.write_text(HEADER + "X,Y,a,t a,b,t b,a.jpg,b.jpg,1\n")
  first = esspr_tfds.build_pairs_dataset(csv, image_dirs[0], tmp_path / "tfds", "pairs")
  red = Image.open(io.BytesIO(first.source()[0]["trigger"]["image"])).getpixel((8, 8))
  with caplog.at_level(logging.WARNING, logger="esspr_jax.input.esspr_tfds"):
    second = esspr_tfds.build_pairs_dataset(csv, image_dirs[1], tmp_path / "tfds", "pairs")
  blue = Image.open(io.BytesIO(second.source()[0]["trigger"]["image"])).getpixel((8, 8))
  assert red[0] > 150 and blue[2] > 150  # the new dir's pictures, not the old dataset's
  assert "image_dir changed" in caplog.text
  assert second.report["image_dir"] == str(image_dirs[1])


class _Hung(BaseException):
  pass


def test_fifo_and_escaping_symlink_rows_are_counted_and_the_build_finishes(tmp_path,
                                                                           image_dirs):
  images = image_dirs[0]
  os.mkfifo(images / "pipe.jpg")
  _jpeg(tmp_path / "outside.jpg", (0, 200, 0))
  (images / "link.jpg").symlink_to(tmp_path / "outside.jpg")
  csv = tmp_path / "pairs.csv"
  csv.write_text(HEADER + "X,Y,a,t a,b,t b,a.jpg,b.jpg,1\nX,Y,a,t a,p,t p,a.jpg,pipe.jpg,1\n"
                 "X,Y,a,t a,l,t l,a.jpg,link.jpg,1\nX,Y,b,t b,c,t c,b.jpg,c.jpg,1\n")
  def hung(signum, frame):
    raise _Hung("the build hung on the FIFO")  # not an OSError: nothing may swallow it
  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(30)  # a regression fails here instead of hanging the suite
  try:
    ds = esspr_tfds.build_pairs_dataset(csv, images, tmp_path / "tfds", "pairs",
                                        max_bad_fraction=0.5)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
  assert ds.num_examples == 2
  assert ds.report["skipped_by_reason"] == {"bad_image_path": 2}


def test_a_failed_rebuild_keeps_the_good_dataset(tmp_path, image_dirs):
  """25.8: the old dataset was deleted before the rebuild; a rebuild that fails (here
  too many bad rows) now leaves it whole and in use."""
  csv = tmp_path / "pairs.csv"
  csv.write_text(HEADER + "X,Y,a,t a,b,t b,a.jpg,b.jpg,1\nX,Y,a,t a,c,t c,a.jpg,c.jpg,1\n")
  first = esspr_tfds.build_pairs_dataset(csv, image_dirs[0], tmp_path / "tfds", "pairs")
  csv.write_text(HEADER + "X,Y,a,t a,b,t b,a.jpg,b.jpg,1\nX,Y,a,t a,d,t d,a.jpg,gone.jpg,1\n")
  with pytest.raises(DataError, match="rows were bad"):
    esspr_tfds.build_pairs_dataset(csv, image_dirs[0], tmp_path / "tfds", "pairs",
                                   max_bad_fraction=0.1)
  kept = esspr_tfds.open_pairs(first.path)
  assert kept.num_examples == 2 and kept.report == first.report
  assert [x["recall"]["id"] for x in kept.source()] == [b"b", b"c"]
  assert sorted(p.name for p in (tmp_path / "tfds").iterdir()) == [esspr_tfds.BUILDER_NAME]


_KILLED_BUILD = """
import os, signal, sys
from esspr_jax.input import esspr_tfds
real = esspr_tfds.generate_examples
def killed_after_one(config, report):
  for n, example in enumerate(real(config, report)):
    if n == 1:
      os.kill(os.getpid(), signal.SIGKILL)  # a kill mid-rebuild
    yield example
esspr_tfds.generate_examples = killed_after_one
esspr_tfds.build_pairs_dataset(sys.argv[1], sys.argv[2], sys.argv[3], "pairs")
"""


def test_a_killed_rebuild_keeps_the_good_dataset_and_the_next_cleans_up(tmp_path, image_dirs):
  """25.8 / 25.21: a rebuild SIGKILLed mid-way (a real process) leaves the old dataset in
  place; the next build removes the killed one's leftovers (and TFDS `incomplete.*`
  dirs of builds made in place) and swaps the new dataset in."""
  import subprocess
  import sys
  csv = tmp_path / "pairs.csv"
  csv.write_text(HEADER + "X,Y,a,t a,b,t b,a.jpg,b.jpg,1\n")
  data = tmp_path / "tfds"
  first = esspr_tfds.build_pairs_dataset(csv, image_dirs[0], data, "pairs")
  csv.write_text(HEADER + "X,Y,a,t a,b,t b,a.jpg,b.jpg,1\nX,Y,a,t a,c,t c,a.jpg,c.jpg,1\n"
                 "X,Y,b,t b,c,t c,b.jpg,c.jpg,1\n")
  script = tmp_path / "killed_build.py"
  script.write_text(_KILLED_BUILD)
  repo = pathlib.Path(__file__).resolve().parents[2]
  done = subprocess.run([sys.executable, str(script), str(csv), str(image_dirs[0]), str(data)],
                        env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
  assert esspr_tfds.open_pairs(first.path).num_examples == 1
  (first.path.parent / "incomplete.AB12CD_1.0.0").mkdir()  # as TFDS leaves in place
  leftovers = [p for p in data.rglob("*") if ".building" in p.parts or "incomplete." in p.name]
  assert leftovers
  rebuilt = esspr_tfds.build_pairs_dataset(csv, image_dirs[0], data, "pairs")
  assert rebuilt.path == first.path and rebuilt.num_examples == 3
  assert not [p for p in data.rglob("*") if ".building" in p.parts or "incomplete." in p.name]
