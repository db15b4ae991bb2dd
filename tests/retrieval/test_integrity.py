"""Opening an export never runs code from it: planted pickles, extra files and altered
files are refused with a clear error (exit 2 from the command) and no side effect."""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from esspr_jax.ingest.catalog import Listing
from esspr_jax.retrieval import export, index, integrity, search

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Payload:
  """Unpickling this creates the file `marker`: the side effect that must never happen."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def scann_export(tiny, tmp_path_factory):
  items, listings = [], {}
  for n, pair in enumerate(tiny.source):
    for side in ("trigger", "recall"):
      s = dict(pair[side])
      items.append(s)
      listings[s["id"]] = Listing(s["id"], f"sup{n % 3}", "lv1", "c", s["title"], "x.jpg")
  config = tiny.config.copy_and_resolve_references()
  config.eval.index.exact_max_gallery = 0
  config.eval.export.modalities = "m"
  out = tmp_path_factory.mktemp("integrity") / "export"
  manifest = export.export_embeddings(tiny.model, tiny.params, items, out, config,
                                      tokenizer=tiny.tokenizer, listings=listings,
                                      checkpoint_info={"checkpoint": None, "step": 1})
  assert manifest["index"]["m"]["kind"] == "scann"
  return out, items


def test_scann_export_has_no_pickle_and_loads_without_one(scann_export):
  out, items = scann_export
  files = integrity.list_files(out)
  assert not [f for f in files if f.endswith(".pkl")]
  assert any(f.startswith("index/m/") and f.endswith(".npy") for f in files)
  hits = search.Searcher(out).by_id(items[0]["id"], k=3)
  assert len(hits) == 3


@pytest.mark.parametrize("where", ["index/m/scann_docids.pkl", "evil.pkl", "index/m/notes.txt"])
def test_planted_files_are_refused_before_anything_is_unpickled(scann_export, tmp_path, where):
  out, items = scann_export
  copy = tmp_path / "export"
  shutil.copytree(out, copy)
  marker = tmp_path / "pwned"
  (copy / where).write_bytes(pickle.dumps(Payload(marker)))
  with pytest.raises(integrity.ExportRefused, match="pickle files|not in its manifest"):
    search.Searcher(copy).by_id(items[0]["id"])
  if where == "index/m/scann_docids.pkl":   # the index loader on its own refuses it too
    with pytest.raises(integrity.DataError, match="refusing index .*scann_docids.pkl"):
      index.load_index(copy / "index" / "m")
  assert not marker.exists()


def test_altered_files_are_refused_by_sha256(scann_export, tmp_path):
  out, items = scann_export
  copy = tmp_path / "export"
  shutil.copytree(out, copy)
  vectors = copy / export.shard_name("emb_m", 0, 1)
  data = np.load(vectors)
  data[0] = -data[0]
  np.save(vectors, data)
  s = search.Searcher(copy)                     # ids and listings are intact
  with pytest.raises(integrity.ExportRefused, match="emb_m.*differs from its manifest"):
    s.by_id(items[0]["id"])
  (copy / "index" / "m" / "dataset.npy").write_bytes(b"\x93NUMPY garbage")
  with pytest.raises(integrity.ExportRefused, match="dataset.npy differs"):
    search.Searcher(copy).index("m")
  os.symlink("/etc/passwd", copy / "link")
  with pytest.raises(integrity.ExportRefused, match="symlinks|not in its manifest"):
    search.Searcher(copy)


def test_search_command_exits_2_on_a_planted_pickle_with_no_side_effect(scann_export, tmp_path):
  out, items = scann_export
  copy = tmp_path / "export"
  shutil.copytree(out, copy)
  marker = tmp_path / "pwned"
  (copy / "index" / "m" / "scann_docids.pkl").write_bytes(pickle.dumps(Payload(marker)))
  proc = subprocess.run(
      [sys.executable, "-m", "esspr_jax.main", f"--config={ROOT}/configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", "--mode=search", f"--export_dir={copy}",
       f"--listing_id={items[0]['id']}", "--gallery=m"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "refusing export" in proc.stderr and "scann_docids.pkl" in proc.stderr
  assert not marker.exists()


def test_ansi_escapes_never_reach_the_console():
  evil = "red mug\x1b[2J\x1b[31m!\x1b[0m\x1b]0;owned\x07\x1b]8;;http://x\x1b\\link\x9b31m\rover"
  line = search.format_hits([search.Hit("L1\x1b[8m", 0.5, evil, "S\x1b[1m1")])
  assert "\x1b" not in line and "\x9b" not in line and "\r" not in line and "\x07" not in line
  assert "red mug!" in line and "link" in line and "owned" not in line and "L1" in line
