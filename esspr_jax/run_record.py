"""What a run was started with, and what later resumes changed: config.json is written
once, when the run starts, and each resume that changes the config appends one line to
config_history.jsonl instead of overwriting it.

A resume compares the new config with the saved one (config.json with the history
applied). Keys that shape the train state or the data it is positioned in (the model,
the batch shapes, the datasets and their order, the seed, switching the composed-query
term on or off) cannot change under a checkpoint: such a change is a ConfigError naming every such key, before any restore
(Orbax would fail with a shape traceback, or resume silently on other data). Every
other change (optimizer, schedule, steps, logging, eval, loss weights, performance
knobs) is allowed, logged and recorded.

The train dataset a run started on is recorded too (train_dataset.json: what its build
says it was made from): a resume on a dataset rebuilt from other pairs since then is
refused, since the checkpoint's data position would point into other data.
"""
import json
import logging
import os
import time
from typing import Any, Mapping

from etils import epath

from esspr_jax import atomic_io
from esspr_jax.errors import ConfigError
from esspr_jax.jsonl import append_jsonl, read_jsonl

log = logging.getLogger(__name__)

CONFIG = "config.json"
HISTORY = "config_history.jsonl"
DATASET = "train_dataset.json"

# Changing these under a checkpoint is refused (dotted prefixes; "x." covers a section).
FIXED = ("model.", "seed", "train.batch_size", "train.composed_batch_size",
         "data.world.", "data.mining.", "data.pipeline.build.",
         "data.pipeline.train_dataset", "data.pipeline.composed_dataset",
         "data.pipeline.shuffle_seed")
# ... except these, which do not shape the state: rematerialisation, and the pretrained
# weights a fresh run starts from (a resume restores its own params instead).
FREE_WITHIN_FIXED = ("model.remat", "model.image.init_from.", "model.text.init_from.")

_ABSENT = "<absent>"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'train.optimizer.learning_rate': 1e-3, ...}; lists stay values."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _plain(config) -> dict:
  """The config as JSON would store it (tuples -> lists), so saved and new compare."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(tree, sort_keys=True, default=str))


def changes(saved: Mapping, current: Mapping) -> dict[str, tuple[Any, Any]]:
  """{key: (saved value, new value)} over the flattened configs; a key only one side
  has shows `<absent>` on the other."""
  old, new = flatten(saved), flatten(current)
  return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT))
          for k in sorted(set(old) | set(new)) if old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def is_fixed(key: str) -> bool:
  """Whether a change of `key` is refused on resume."""
  def matches(prefix):
    return key == prefix or (prefix.endswith(".") and key.startswith(prefix))
  return any(map(matches, FIXED)) and not any(map(matches, FREE_WITHIN_FIXED))


def _on(weight) -> bool:
  return isinstance(weight, (int, float)) and weight > 0


def _switches_composed(key: str, old, new) -> bool:
  """Turning the composed-query term on or off adds or drops a sub-batch: a data shape."""
  return key == "loss.composed.weight" and _on(old) != _on(new)


def _switches_loss_params(key: str, old, new, weighting_kind: str) -> bool:
  """Uncertainty weighting keeps one learned log-variance per enabled term in the
  params: switching it on or off, or a term on or off under it, changes their shape."""
  if key == "loss.weighting.kind":
    return (old == "uncertainty") != (new == "uncertainty")
  is_term_weight = key.startswith(("loss.pairs.", "loss.pdc.", "loss.plc.")) or (
      key == "loss.composed.weight")
  return (weighting_kind == "uncertainty" and is_term_weight and key.endswith(".weight")
          and _on(old) != _on(new))


def saved_config(workdir) -> dict | None:
  """The config the run has now: config.json with every history line applied."""
  root = epath.Path(workdir)
  if not (root / CONFIG).exists():
    return None
  flat = flatten(json.loads((root / CONFIG).read_text()))
  for entry in read_history(workdir):
    for key, change in entry.get("changes", {}).items():
      if change.get("to", _ABSENT) == _ABSENT:
        flat.pop(key, None)
      else:
        flat[key] = change["to"]
  return _unflatten(flat)


def _unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def read_history(workdir) -> list[dict]:
  return read_jsonl(epath.Path(workdir) / HISTORY)


def reconcile_config(workdir, config, *, resuming: bool, step: int | None = None,
                     write: bool = True) -> dict[str, tuple[Any, Any]]:
  """Records `config` for a run in `workdir`; returns the changes a resume brings.

  Fresh run (`resuming` False): writes config.json. Resume: refuses changes of FIXED
  keys (ConfigError naming them all); records others in config_history.jsonl (one line:
  time, step, {key: {from, to}}) and logs them. Only the writing process (`write`) writes;
  every process checks.
  """
  root = epath.Path(workdir)
  current = _plain(config)
  saved = saved_config(workdir) if resuming else None
  if saved is None:
    if write:
      atomic_io.write_json(root / CONFIG, current)
    return {}
  diff = changes(saved, current)
  kind = flatten(current).get("loss.weighting.kind", "fixed")
  fixed = {k: v for k, v in diff.items()
           if is_fixed(k) or _switches_composed(k, *v) or _switches_loss_params(k, *v, kind)}
  if fixed:
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in fixed.items())
    raise ConfigError(next(iter(fixed)), f"cannot resume the run in {os.fspath(workdir)} "
                      f"with a different model or data shape ({listed}). Set these back to "
                      f"the saved values ({root / CONFIG}), or start a new --workdir")
  if diff:
    log.warning("resuming %s with config changes (recorded in %s): %s", os.fspath(workdir),
                HISTORY, "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in diff.items()))
    if write:
      append_jsonl(root / HISTORY, {
          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumed_at_step": step,
          "changes": {k: {"from": o, "to": n} for k, (o, n) in diff.items()}})
  return diff


def dataset_identity(data_dir, name: str) -> dict | None:
  """What the built dataset `name` in `data_dir` was made from (the pair files' bytes
  and the build settings, from the `inputs` its build wrote to metadata.json; paths are
  left out, so a moved workdir keeps its identity), or None where none is built."""
  if not data_dir or not epath.Path(data_dir).is_dir():
    return None
  from esspr_jax.input import esspr_tfds  # noqa: PLC0415  (TensorFlow Datasets: only with data)
  path = epath.Path(data_dir) / esspr_tfds.BUILDER_NAME / name / str(esspr_tfds.EssprPairs.VERSION)
  meta = path / "metadata.json"
  inputs = json.loads(meta.read_text()).get("inputs") if meta.exists() else None
  if not inputs:
    return None
  return {"name": name, "path": os.fspath(path), "pairs": inputs.get("csv_path"),
          "csv_sha256": inputs.get("csv_sha256"), "settings": inputs.get("settings")}


def check_dataset(workdir, identity: dict | None, *, resuming: bool, write: bool = True) -> None:
  """Records the train dataset's `identity` when the run starts (and where an older run
  has none); on resume, refuses (ConfigError) a dataset whose pairs or build settings
  changed since. Only the writing process (`write`) writes; every process checks."""
  record = epath.Path(workdir) / DATASET
  saved = json.loads(record.read_text()) if resuming and record.exists() else None
  if saved and identity and any(saved.get(k) != identity[k] for k in ("csv_sha256", "settings")):
    raise ConfigError(
        "data.pipeline.train_dataset",
        f"cannot resume the run in {os.fspath(workdir)}: its train dataset "
        f"{identity['name']!r} ({identity['path']}) was rebuilt from other pairs or settings "
        f"since the run started (now from {identity['pairs']}, then from {saved.get('pairs')}; "
        f"{record}). Rebuild it from the run's pairs, or train on the new data in a new "
        f"--workdir")
  if write and saved is None:
    if identity:
      atomic_io.write_json(record, identity)
    elif not resuming and record.exists():
      record.unlink()  # a fresh run on data with no build record: none to keep
