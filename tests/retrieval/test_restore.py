"""Params come back from a trainer checkpoint; another model config is refused by name."""
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esspr_jax import checkpoint as checkpoint_lib
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.retrieval import restore
from esspr_jax.train import TrainState


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
  run = tmp_path_factory.mktemp("run")
  ckpt = checkpoint_lib.Checkpointer(run / "checkpoints", every=1, keep=2, async_save=False)
  params = jax.tree_util.tree_map(lambda x: x + 1.0, tiny.params)  # not the init values
  state = TrainState(step=jnp.asarray(3, jnp.int32), params=params,
                     opt_state={"mu": jax.tree_util.tree_map(jnp.zeros_like, params)})
  ckpt.save(3, state, iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
  ckpt.close()
  (run / "config.json").write_text(json.dumps(tiny.config.to_dict(), default=str))
  return run, params


def test_params_round_trip(tiny, run_dir):
  run, params = run_dir
  model, restored, info = restore.load_model_and_params(tiny.config, run)
  assert info["step"] == 3 and info["checkpoint"].endswith("checkpoints/3")
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The checkpoints dir itself works too, and a missing step is named.
  assert restore.load_model_and_params(tiny.config, run / "checkpoints")[2]["step"] == 3
  with pytest.raises(DataError, match="no step 9; it has \\[3\\]"):
    restore.load_model_and_params(tiny.config, run, step=9)


def test_checkpoint_from_another_config_is_refused(tiny, run_dir, tmp_path):
  other = tiny.config.copy_and_resolve_references()
  other.model.embed_dim = 48
  with pytest.raises(ConfigError, match="model.embed_dim: checkpoint 32 vs config 48"):
    restore.load_model_and_params(other, run_dir[0])
  with pytest.raises(DataError, match="no checkpoints under"):
    restore.load_model_and_params(tiny.config, tmp_path)


def test_shape_mismatch_without_a_run_config_is_named(tiny, run_dir, tmp_path):
  import shutil
  shutil.copytree(run_dir[0] / "checkpoints", tmp_path / "ckpts")   # no config.json beside it
  other = tiny.config.copy_and_resolve_references()
  other.model.embed_dim = 48
  with pytest.raises(ConfigError, match="does not fit this model config: .*checkpoint \\(.*32.*\\) vs model"):
    restore.load_model_and_params(other, tmp_path / "ckpts")


def test_runtime_only_keys_may_differ(tiny, run_dir):
  other = tiny.config.copy_and_resolve_references()
  other.model.dropout = 0.5
  restore.check_same_model_config(tiny.config.model.to_dict(), other.model, "here")
  other.model.text.depth += 1
  with pytest.raises(ConfigError, match="model.text.depth"):
    restore.check_same_model_config(tiny.config.model.to_dict(), other.model, "here")


def _cut_array_files(step_dir) -> None:
  """Halves every array chunk file of a checkpoint (a disk that filled during the save)."""
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_a_damaged_newest_checkpoint_falls_back_and_a_damaged_step_is_named(tiny, tmp_path,
                                                                             caplog):
  """25.18: eval/export/search/duplicates take the newest checkpoint that restores (as
  training does), without moving anything; an explicit damaged --step is one DataError."""
  run = tmp_path / "run"
  ckpt = checkpoint_lib.Checkpointer(run / "checkpoints", every=1, keep=3, async_save=False)
  saved = {}
  for step in (3, 4):
    saved[step] = jax.tree_util.tree_map(lambda x, s=step: x + s, tiny.params)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=saved[step], opt_state={})
    ckpt.save(step, state, iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
  ckpt.close()
  (run / "config.json").write_text(json.dumps(tiny.config.to_dict(), default=str))
  _cut_array_files(run / "checkpoints" / "4")

  with caplog.at_level("WARNING", logger="esspr_jax"):
    _, params, info = restore.load_model_and_params(tiny.config, run)
  assert info["step"] == 3 and info["checkpoint"].endswith("checkpoints/3")
  for a, b in zip(jax.tree_util.tree_leaves(saved[3]), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert str(run / "checkpoints" / "4") in caplog.text
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "4"]  # read only

  with pytest.raises(DataError, match=r"checkpoint .*checkpoints/4 does not restore \(") as e:
    restore.load_model_and_params(tiny.config, run, step=4)
  assert "\n" not in str(e.value)
  _cut_array_files(run / "checkpoints" / "3")
  with pytest.raises(DataError, match=r"no checkpoint in .*checkpoints restores: .*/4: .*/3: "):
    restore.load_model_and_params(tiny.config, run)
