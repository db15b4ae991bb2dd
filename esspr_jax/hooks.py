"""Periodic hooks of the train loop: evaluation, hard-negative mining, anything later.

The loop (train.py) knows only this interface, so it imports neither `retrieval/` nor
`hard_negatives/`; their hooks are built by the caller (stages.training_hooks) and
passed to `train(hooks=...)`. The contract (docs/training.md, "Hooks"):

- `views(views)`: the step's views plus any side the hook adds to the batch (the
  miner adds 'hard_negative'); `side_rows` gives that side's rows per pair, and
  `attach` the Grain transform that adds it to the project's pipeline (at most one
  hook attaches). A hook with `attach` needs the project's pipeline, not a caller's
  `train_dataset`.
- `on_start(ctx, state, step)`: once, after restore-or-init, before the first step
  (the miner reloads its tables or mines its first one).
- `due(step)`: asked once per step after that step's update, for steps before the
  last; `at_end(step)` once when a run finishes, after its last checkpoint (not when
  it is preempted).
- `run(ctx, state, step)`: the work. It reads `state`, never changes it; it may write
  its own metrics rows through `ctx.writer`. Hooks run in the order given, before the
  step's checkpoint (the miner: that checkpoint's resume must find its table) unless
  `after_checkpoint` (eval). A `sync` hook makes its steps sync points: the loop reads
  the step metrics, and so applies the non-finite policy, before it runs.
"""
import dataclasses
import time
from typing import Any, Callable, Mapping

# (params, step) -> {metric: float}
EvalFn = Callable[[Any, int], Mapping[str, float] | None]


@dataclasses.dataclass(frozen=True)
class Context:
  """What the loop lends a hook: the model and views the step runs, the batch
  sharding (embed with the trainer's layout), the metrics writer, the run's steps."""
  model: Any
  views: Mapping[str, tuple]
  batch_sharding: Any
  writer: Any  # metrics_writer.MetricsWriter
  steps: int


class Hook:
  """A periodic job of the loop; the defaults do nothing, a hook overrides what it uses."""
  after_checkpoint = False
  sync = False
  attach = None  # a grain MapWithIndex transform for the pipeline's batches, or None
  side_rows: Mapping[str, int] = {}  # batch key -> rows per pair, for the sides it adds

  def views(self, views: Mapping[str, tuple]) -> Mapping[str, tuple]:
    return views

  def on_start(self, ctx: Context, state, step: int) -> None:
    pass

  def due(self, step: int) -> bool:
    return False

  def at_end(self, step: int) -> bool:
    return False

  def run(self, ctx: Context, state, step: int) -> None:
    pass


class EvalHook(Hook):
  """`fn(params, step) -> scalars` every `every_steps` steps (0: never) and at the end
  (with `at_end`, or when the last step is a multiple); each result is a metrics row
  of kind 'eval' with its `eval_seconds`, the latest kept as `metrics`."""
  after_checkpoint = True
  sync = True

  def __init__(self, fn: EvalFn, every_steps: int = 0, at_end: bool = False):
    self.fn = fn
    self.every = int(every_steps or 0)
    self.final = bool(at_end)
    self.metrics: dict | None = None

  @classmethod
  def from_config(cls, config, fn: EvalFn) -> "EvalHook":
    """Scheduled by eval.every_steps and train.eval_at_end."""
    return cls(fn, config.eval.get("every_steps", 0), config.train.eval_at_end)

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def at_end(self, step: int) -> bool:
    return self.final or self.due(step)

  def run(self, ctx: Context, state, step: int) -> None:
    start = time.time()
    result = self.fn(state.params, step)
    if result:
      self.metrics = dict(result)
      ctx.writer.write(step, {**self.metrics, "eval_seconds": time.time() - start}, kind="eval")
