"""Model params from a training checkpoint, for eval, export and search.

    model, params, info = load_model_and_params(config, run_dir_or_checkpoints_dir, step=None)

Reads only the params of the saved train state (not optimizer state or the data
iterator). A checkpoint trained with a different model config is refused with a
ConfigError naming the differing keys (the run's config.json, written by the trainer,
is compared with `config.model`); a shape mismatch that slipped past that is reported
per parameter rather than as an Orbax traceback. Without a step, the newest checkpoint
that restores is read (a damaged newer one is named in a warning, as training does);
a named step that does not restore is a DataError naming it.
"""
import hashlib
import json
import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from esspr_jax import checkpoint as checkpoint_lib
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.models import build_model, example_side


def config_hash(section) -> str:
  """A short stable hash of a config section (what an export records)."""
  data = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(d) -> dict:
  """{'a.b': leaf} of a JSON-like nested dict."""
  return traverse_util.flatten_dict(d, sep=".")


# Keys that do not change what trained params compute at inference: how to run
# (dropout, rematerialisation, compute dtype) or how params were first initialised.
_RUNTIME_ONLY = ("dropout", "remat", "remat_policy", "dtype", "logit_scale_init", "logit_bias_init")


def _matters(key: str) -> bool:
  return key not in _RUNTIME_ONLY and ".init_from." not in key


def check_same_model_config(saved: dict, config_model, where: str) -> None:
  """Raises ConfigError naming the keys where the saved model config differs (keys
  that only affect training or initialisation, e.g. dropout, may differ)."""
  now = _flat(json.loads(json.dumps(config_model.to_dict(), default=str)))
  then = _flat(json.loads(json.dumps(saved, default=str)))
  diff = sorted(k for k in set(now) | set(then)
                if _matters(k) and now.get(k, "<missing>") != then.get(k, "<missing>"))
  if diff:
    shown = ", ".join(f"model.{k}: checkpoint {then.get(k, '<missing>')!r} vs config "
                      f"{now.get(k, '<missing>')!r}" for k in diff[:5])
    raise ConfigError(f"model.{diff[0]}", f"the checkpoint at {where} was trained with another "
                      f"model config ({len(diff)} differing keys: {shown})")


def _locate(path) -> tuple[epath.Path, epath.Path | None]:
  """(checkpoints dir, run dir or None) from a run dir or a checkpoints dir (local, or a
  gs:// URL: epath keeps it one, where pathlib would make it 'gs:/...')."""
  path = epath.Path(os.fspath(path))
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", path
  if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
    run = path.parent if (path.parent / "config.json").is_file() else None
    return path, run
  raise DataError(f"no checkpoints under {path} (want a run dir with checkpoints/ or a "
                  f"checkpoints dir with numbered steps)")


def load_model_and_params(config, path, step: int | None = None):
  """(model, params, {'checkpoint': dir, 'step': int, 'config_hash': str})."""
  ckpt_dir, run_dir = _locate(path)
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  if not steps:
    raise DataError(f"{ckpt_dir} holds no finished checkpoint")
  if step is not None and step not in steps:
    raise DataError(f"{ckpt_dir} has no step {step}; it has {steps}")
  if run_dir is not None and (run_dir / "config.json").is_file():
    saved = json.loads((run_dir / "config.json").read_text())
    if "model" in saved:
      check_same_model_config(saved["model"], config.model, str(run_dir))

  model = build_model(config.model)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      example_side(config.model, 1))["params"]))
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {"params": jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)}

  def params_at(at: int):
    state_dir = ckpt_dir / str(at) / "state"
    meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    saved_tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    _check_shapes(saved_tree, target["params"], state_dir)
    return ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))["params"]

  path_of = lambda at: ckpt_dir / str(at)  # noqa: E731
  if step is None:  # the newest that restores, as training resumes (damaged ones named)
    step, params, _ = checkpoint_lib.newest_that_restores(steps, params_at, path_of, ckpt_dir)
  else:
    params = checkpoint_lib.restore_step(step, params_at, path_of)
  return model, params, {"checkpoint": str(ckpt_dir / str(step)), "step": step,
                         "config_hash": config_hash(config.model)}


def _check_shapes(saved_tree, target_params, where) -> None:
  try:
    saved = saved_tree["params"]
  except (KeyError, TypeError):
    return  # unknown metadata layout: let Orbax report
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(target_params)}
  have = {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()) or ())
          for p, x in jax.tree_util.tree_leaves_with_path(saved)}
  bad = [f"{k}: checkpoint {have.get(k, 'missing')} vs model {v}" for k, v in want.items()
         if have.get(k) is not None and have[k] != v or k not in have]
  if bad:
    raise ConfigError("model", f"checkpoint {where} does not fit this model config: "
                      + "; ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
