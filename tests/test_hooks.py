"""The loop's hook contract (esspr_jax/hooks.py): when each hook runs relative to the
step's checkpoint, at the start and at the end, and what a sync hook guarantees."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import standin  # noqa: E402

from esspr_jax import hooks, train  # noqa: E402
from esspr_jax.config import compose  # noqa: E402


class Recorder(hooks.Hook):
  """Every second step and at the end; notes whether that step's checkpoint exists."""

  def __init__(self, name, events, checkpoints, after_checkpoint=False, sync=False):
    self.name, self.events, self.checkpoints = name, events, checkpoints
    self.after_checkpoint, self.sync = after_checkpoint, sync

  def on_start(self, ctx, state, step):
    self.events.append((self.name, "start", step, ctx.steps))

  def due(self, step):
    return step % 2 == 0

  def at_end(self, step):
    return True

  def run(self, ctx, state, step):
    saved = (self.checkpoints / str(step)).is_dir()
    self.events.append((self.name, "run", step, saved))


def _config(steps, **train_overrides):
  config = compose("tiny")
  config.train.update(dict(steps=steps, batch_size=8, log_every=1) | train_overrides)
  config.train.schedule.warmup_steps = 1
  config.train.checkpoint.every = 2
  config.train.checkpoint.async_save = False
  return config


def _train(config, workdir, hooks, nan_at=()):
  return train.train(config, workdir, model=standin.StandInModel(nan_on_marker=True),
                     loss_fn=standin.standin_loss, train_dataset=standin.dataset(8, nan_at),
                     hooks=hooks)


def test_hooks_run_before_or_after_the_checkpoint_and_at_the_end(tmp_path):
  events, checkpoints = [], tmp_path / "checkpoints"
  _train(_config(4), tmp_path, [Recorder("mine", events, checkpoints),
                                Recorder("eval", events, checkpoints, after_checkpoint=True)])
  assert events == [("mine", "start", 0, 4), ("eval", "start", 0, 4),
                    ("mine", "run", 2, False), ("eval", "run", 2, True),
                    # the last step is not periodic: at_end, after its checkpoint
                    ("mine", "run", 4, True), ("eval", "run", 4, True)]


def test_a_sync_hook_sees_no_non_finite_update(tmp_path):
  """Metrics are read (and the non-finite policy applied) before a sync hook runs: the
  bad update of step 2 stops the run at step 2, not at the log step 3."""
  events = []
  config = _config(6, log_every=3)
  config.train.checkpoint.every = 6
  recorder = Recorder("eval", events, tmp_path / "checkpoints", after_checkpoint=True,
                      sync=True)
  with pytest.raises(train.NonFiniteLossError, match="at step 2 "):
    _train(config, tmp_path, [recorder], nan_at={1})
  assert events == [("eval", "start", 0, 6)]


def test_eval_hook_writes_rows_and_keeps_the_latest(tmp_path):
  config = _config(3)
  config.eval.every_steps = 2
  config.train.eval_at_end = False
  hook = hooks.EvalHook.from_config(config, lambda params, step: {"at": float(step)})
  result = _train(config, tmp_path, [hook])
  assert (hook.every, hook.final) == (2, False)
  assert hook.metrics == result.eval_metrics == {"at": 2.0}  # not at 3: no at_end
  assert hook.at_end(4) and not hook.at_end(3)
