"""The eSSPR pairs TFDS builder (esspr_jax/input/esspr_tfds.py): real sample, bad input."""
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from esspr_jax.input import esspr_tfds
from esspr_jax.errors import ConfigError, DataError

SAMPLE_CSV = "same_trigger_recall_pairs_information"


@pytest.fixture(scope="module")
def sample(shared_data, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  ds = esspr_tfds.build_pairs_dataset(shared_data / "esspr_sample" / SAMPLE_CSV,
                                      shared_data / "esspr_sample", data_dir, "sample",
                                      max_image_side=128)
  return ds, data_dir


def test_esspr_sample_ingests_ten_pairs_with_titles_and_twenty_images(sample, shared_data):
  ds, _ = sample
  with open(shared_data / "esspr_sample" / SAMPLE_CSV, newline="", encoding="utf-8") as f:
    want = list(csv.reader(f, skipinitialspace=True))[1:]
  assert ds.num_examples == 10
  assert ds.report["examples_written"] == 10 and ds.report["skipped"] == 0
  assert ds.report["images_prepared"] == 20
  source = ds.source()
  assert len(source) == 10
  for example, (tid, ttitle, timg, rid, rtitle, rimg) in zip(
      (source[i] for i in range(10)), want):
    assert example["trigger"]["id"].decode() == tid
    assert example["trigger"]["title"].decode("utf-8") == ttitle
    assert example["recall"]["id"].decode() == rid
    assert example["recall"]["title"].decode("utf-8") == rtitle
    assert example["label"] == 1
    for side, name in (("trigger", timg), ("recall", rimg)):
      img = Image.open(io.BytesIO(example[side]["image"]))
      img.load()
      original = Image.open(shared_data / "esspr_sample" / name)
      assert img.mode == "RGB" and img.format == "JPEG" and max(img.size) == 128
      assert abs(img.size[0] / img.size[1] - original.size[0] / original.size[1]) < 0.02


def test_existing_dataset_is_reused_and_rebuilt_when_the_csv_changes(sample, shared_data,
                                                                     tmp_path):
  ds, data_dir = sample
  record = next(ds.path.glob("*.array_record*"))
  mtime = record.stat().st_mtime_ns
  again = esspr_tfds.build_pairs_dataset(shared_data / "esspr_sample" / SAMPLE_CSV,
                                         shared_data / "esspr_sample", data_dir, "sample",
                                         max_image_side=128)
  assert again == ds and record.stat().st_mtime_ns == mtime
  fewer = tmp_path / "three.csv"
  fewer.write_text("".join((shared_data / "esspr_sample" / SAMPLE_CSV).read_text()
                           .splitlines(keepends=True)[:4]), encoding="utf-8")
  rebuilt = esspr_tfds.build_pairs_dataset(fewer, shared_data / "esspr_sample", data_dir,
                                           "sample", max_image_side=128)
  assert rebuilt.num_examples == 3 and len(rebuilt.source()) == 3


def _write_jpeg(path, color, size=(24, 24)):
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
  path.write_bytes(buf.getvalue())
  return buf.getvalue()


@pytest.fixture
def messy(tmp_path):
  """A pair file with one row of every bad kind (line numbers in comments)."""
  img = tmp_path / "images"
  img.mkdir()
  for name, color in [("a1", (255, 0, 0)), ("b1", (0, 255, 0)), ("a2", (0, 0, 255)),
                      ("b2", (9, 9, 9)), ("a3", (50, 50, 50)), ("a6", (60, 0, 0)),
                      ("b6", (0, 60, 0)), ("a7", (0, 0, 60)), ("b7", (90, 90, 0))]:
    _write_jpeg(img / f"{name}.jpg", color)
  (img / "corrupt.jpg").write_bytes(b"\x00garbage" * 50)
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noise).save(buf, format="JPEG")
  (img / "truncated.jpg").write_bytes(buf.getvalue()[:1500])
  head = "cate_lv1_name,cate_name,trigger_id,trigger_title,recall_id,recall_title,trigger_img,recall_img,label\n"
  lines = [
      head.encode(),
      b"Tools,Bolts,a1,m6 bolt,b1,M6 x 40 bolt,a1.jpg,b1.jpg,1\n",        # 2 good
      b"Tools,Bolts,a2,,b2,hex nut m8,a2.jpg,b2.jpg,1\n",                # 3 empty title: kept
      b"Tools,Bolts,a3,washer,b3,washer m6,a3.jpg,corrupt.jpg,1\n",       # 4 corrupt image
      b"Tools,Bolts,a4,screw,b4,screw 3mm,a1.jpg,truncated.jpg,1\n",      # 5 truncated image
      b"Tools,Bolts,a5,rivet,b5,rivet 4mm,a1.jpg,no_such.jpg,1\n",        # 6 missing image
      b"Tools,Bolts,a8,caf\xe9 mug,b8,mug,a1.jpg,b1.jpg,1\n",             # 7 not UTF-8
      b"Tools,Bolts,a9,too few columns\n",                                # 8 wrong column count
      b"Tools,Bolts,b1,M6 x 40 bolt,a1,m6 bolt,b1.jpg,a1.jpg,1\n",        # 9 duplicate (reversed)
      b"Home,Mugs,a6,owl mug,b6,frog mug,a6.jpg,b6.jpg,0\n",              # 10 label 0: dropped
      "Home,Mugs,a7,tasse \u00e0 caf\u00e9,b7,coffee mug,a7.jpg,b7.jpg,1\n".encode(),  # 11 good
  ]
  csv_path = tmp_path / "pairs.csv"
  csv_path.write_bytes(b"".join(lines))
  return csv_path, img


def test_every_bad_row_kind_is_skipped_and_counted(messy, tmp_path):
  csv_path, img = messy
  ds = esspr_tfds.build_pairs_dataset(csv_path, img, tmp_path / "tfds", "messy",
                                      max_bad_fraction=1.0)
  assert ds.report["skipped_by_reason"] == {
      "corrupt_image": 1, "truncated_image": 1, "missing_image": 1, "bad_encoding": 1,
      "wrong_column_count": 1, "duplicate_pair": 1}
  assert ds.report["rows_read"] == 10 and ds.report["skipped"] == 6
  assert ds.report["dropped_negative_label"] == 1
  assert ds.report["empty_titles_kept"] == {"trigger": 1}
  assert json.loads((ds.path / "metadata.json").read_text())["build_report"] == ds.report
  source = ds.source()
  got = [(source[i]["trigger"]["id"].decode(), source[i]["recall"]["id"].decode(),
          source[i]["source_row"]) for i in range(len(source))]
  assert got == [("a1", "b1", 2), ("a2", "b2", 3), ("a7", "b7", 11)]
  assert source[1]["trigger"]["title"] == b""
  assert source[2]["trigger"]["title"].decode("utf-8") == "tasse \u00e0 caf\u00e9"
  red = np.asarray(Image.open(io.BytesIO(source[0]["trigger"]["image"])))
  assert red.shape == (24, 24, 3) and np.abs(red.astype(int) - [255, 0, 0]).max() < 8


def test_strict_mode_raises_naming_file_and_row(messy, tmp_path):
  csv_path, img = messy
  with pytest.raises(DataError, match=r"pairs\.csv:4: corrupt_image"):
    esspr_tfds.build_pairs_dataset(csv_path, img, tmp_path / "tfds", "messy", strict=True)
  assert not esspr_tfds.dataset_path(tmp_path / "tfds", "messy").exists()


def test_too_many_bad_rows_stop_the_build_and_leave_nothing(messy, tmp_path):
  csv_path, img = messy
  with pytest.raises(DataError, match=r"6 of 10 rows were bad .*max_bad_fraction=0.5"):
    esspr_tfds.build_pairs_dataset(csv_path, img, tmp_path / "tfds", "messy",
                                   max_bad_fraction=0.5)
  built = tmp_path / "tfds" / esspr_tfds.BUILDER_NAME / "messy"
  assert list(built.rglob("*")) == []  # no partial or 'incomplete.*' build left behind


def test_clear_errors_for_missing_inputs_and_bad_names(tmp_path):
  with pytest.raises(DataError, match="pair file not found"):
    esspr_tfds.build_pairs_dataset(tmp_path / "nope.csv", tmp_path, tmp_path / "d", "x")
  (tmp_path / "p.csv").write_text("trigger_id,trigger_title,trigger_img,recall_id,"
                                  "recall_title,recall_img\n")
  with pytest.raises(DataError, match="image dir not found"):
    esspr_tfds.build_pairs_dataset(tmp_path / "p.csv", tmp_path / "no_dir", tmp_path / "d", "x")
  with pytest.raises(ConfigError, match="lower_snake_case"):
    esspr_tfds.build_pairs_dataset(tmp_path / "p.csv", tmp_path, tmp_path / "d", "Bad-Name")
  with pytest.raises(DataError, match="no built pairs dataset"):
    esspr_tfds.open_pairs(tmp_path / "d" / "esspr_pairs" / "x" / "1.0.0")


def test_beam_build_gives_the_same_examples_and_counts(messy, tmp_path):
  csv_path, img = messy
  ds = esspr_tfds.build_pairs_dataset(csv_path, img, tmp_path / "tfds", "messy",
                                      max_bad_fraction=1.0, beam_runner="DirectRunner")
  source = ds.source()
  got = [(source[i]["trigger"]["id"].decode(), source[i]["recall"]["id"].decode(),
          source[i]["source_row"]) for i in range(len(source))]
  assert got == [("a1", "b1", 2), ("a2", "b2", 3), ("a7", "b7", 11)]
  assert ds.report["rows_read"] == 10 and ds.report["skipped"] == 6
  assert ds.report["image_skips"] == 3 and ds.report["dropped_negative_label"] == 1
  assert not (tmp_path / "tfds" / ".staging" / "messy").exists()
  with pytest.raises(DataError, match="6 of 10 rows were bad"):
    esspr_tfds.build_pairs_dataset(csv_path, img, tmp_path / "tfds2", "messy",
                                   max_bad_fraction=0.5, beam_runner="DirectRunner")
  assert not esspr_tfds.dataset_path(tmp_path / "tfds2", "messy").exists()
