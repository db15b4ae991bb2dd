from esspr_jax.ingest import release_format
from esspr_jax.ingest.skips import SkipCounter
import pytest
from esspr_jax.errors import DataError


def test_reads_esspr_sample_header_variant(shared_data):
  rows = list(release_format.read_pairs(shared_data / "esspr_sample" /
                                        "same_trigger_recall_pairs_information"))
  assert len(rows) == 10
  assert rows[0].trigger_id == "item_1"
  assert rows[0].trigger_title == "cheap gold console table design"
  assert rows[0].recall_img == "item_2358.jpg"
  assert all(r.label == 1 for r in rows)


def test_round_trip_and_bad_rows_counted(tmp_path):
  rows = [release_format.PairRow("Tools", "Bolts", "a", "M6 bolt", "b", "m6 bolt 40mm",
                                 "a.jpg", "b.jpg", 1)]
  path = tmp_path / "pairs.csv"
  assert release_format.write_pairs(path, rows) == 1
  with open(path, "a") as f:
    f.write("x,y,only-three\n")
    f.write("T,B,c,t,c,t,c.jpg,c.jpg,1\n")
    f.write("T,B,c,t,d,t,c.jpg,d.jpg,nan\n")
  skips = SkipCounter("pairs")
  assert list(release_format.read_pairs(path, skips)) == rows
  assert skips.summary()["by_reason"] == {"wrong_column_count": 1, "self_pair": 1, "bad_label": 1}
  with pytest.raises(DataError, match="pairs.csv:3"):
    list(release_format.read_pairs(path, SkipCounter("pairs", strict=True)))
