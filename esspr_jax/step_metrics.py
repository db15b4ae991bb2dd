"""Step metrics summed on the devices, so the loop reads them only now and then.

Converting a step's metrics to Python floats waits for that step to finish; doing it
every step keeps the devices idle while the host builds the next batch. Instead the
jitted step adds its metrics into `MetricSums` (a few scalars, replicated), and the
host reads them on log steps, checkpoints, evals and at the end.

The non-finite policy needs no per-step read either: the step number and the metrics
of the first non-finite update are kept here, and the update itself was never
applied (train_step.py).
"""
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

FINITE = "finite"  # the step's 1.0 / 0.0 flag, counted rather than averaged


@flax.struct.dataclass
class MetricSums:
  sums: dict  # {metric: sum over the steps since the last log step}
  steps: jax.Array  # steps since the last log step
  skipped: jax.Array  # non-finite (not applied) updates in this run
  first_bad_step: jax.Array  # step number of the first of them; -1: none yet
  first_bad: dict  # {metric: value at that step}


def zeros(metric_shapes: Mapping[str, Any]) -> MetricSums:
  """Empty sums for a step whose metrics have these shapes (e.g. from eval_shape)."""
  names = [k for k in metric_shapes if k != FINITE]
  zero = lambda: {k: jnp.zeros((), jnp.float32) for k in names}
  return MetricSums(sums=zero(), steps=jnp.zeros((), jnp.int32),
                    skipped=jnp.zeros((), jnp.int32),
                    first_bad_step=jnp.full((), -1, jnp.int32), first_bad=zero())


def add(acc: MetricSums, metrics: Mapping[str, jax.Array], step: jax.Array) -> MetricSums:
  """`acc` plus the metrics of step number `step` (pure; runs inside the jitted step)."""
  bad = metrics[FINITE] < 0.5
  values = {k: jnp.asarray(metrics[k], jnp.float32) for k in acc.sums}
  first = bad & (acc.first_bad_step < 0)
  return MetricSums(
      sums={k: acc.sums[k] + values[k] for k in acc.sums},
      steps=acc.steps + 1,
      skipped=acc.skipped + bad.astype(jnp.int32),
      first_bad_step=jnp.where(first, jnp.asarray(step, jnp.int32), acc.first_bad_step),
      first_bad={k: jnp.where(first, values[k], acc.first_bad[k]) for k in acc.sums})


def restart_interval(acc: MetricSums) -> MetricSums:
  """Zero sums for the next log interval; the run's non-finite record stays."""
  return acc.replace(sums={k: jnp.zeros_like(v) for k, v in acc.sums.items()},
                     steps=jnp.zeros_like(acc.steps))


def read(acc: MetricSums) -> dict:
  """The sums on the host (waits for the steps that produced them):
  {'sums': {k: float}, 'steps', 'skipped', 'first_bad_step': int, 'first_bad': {...}}."""
  host = jax.device_get(acc)
  return {"sums": {k: float(v) for k, v in host.sums.items()}, "steps": int(host.steps),
          "skipped": int(host.skipped), "first_bad_step": int(host.first_bad_step),
          "first_bad": {k: float(np.asarray(v)) for k, v in host.first_bad.items()}}
