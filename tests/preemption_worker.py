"""One process of a 2-process run that a test preempts (tests/test_preemption.py; not a test).

Joins the run with `esspr_jax.distributed.initialize()` (the coordination service, and
with it JAX's preemption service), then trains the tiny config with the stand-in model
(tests/standin.py) through `esspr_jax.train.train` for far more steps than the test
waits for, each process feeding the rows of each global batch its devices hold. The
last line says how it stopped: `WORKER process=P stopped=S step=N`.
"""
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from esspr_jax import distributed  # noqa: E402

distributed.initialize()  # before anything touches a device

import jax  # noqa: E402

import standin  # noqa: E402
import support  # noqa: E402
from esspr_jax import sharding, train  # noqa: E402
from esspr_jax.config import compose  # noqa: E402


def main():
  parser = support.worker_parser(default_steps=2000)
  parser.add_argument("--delay", type=float, default=0.02, help="seconds per batch load")
  args = parser.parse_args()

  config = compose("tiny")
  config.train.steps = args.steps
  config.train.log_every = 5
  config.train.checkpoint.every = 1000  # only the first save and the preemption save
  config.train.schedule.warmup_steps = 1
  config.train.eval_at_end = False
  rows = config.train.batch_size // jax.process_count()
  start = jax.process_index() * rows  # mesh data=-1: process i holds rows [i*rows, ...)
  mesh = sharding.make_mesh(config.train)
  held = sharding.batch_sharding(mesh, sharding.rules(config.train)).addressable_devices_indices_map(
      (config.train.batch_size,))
  assert min(index[0].start or 0 for index in held.values()) == start
  dataset = standin.dataset(config.train.batch_size, delay=args.delay).map(
      lambda batch: jax.tree_util.tree_map(lambda x: x[start:start + rows], batch))
  print(f"WORKER_SERVICE process={jax.process_index()} "
        f"running={distributed.preemption_service_running()}", flush=True)
  result = train.train(config, args.workdir, model=standin.StandInModel(),
                       loss_fn=standin.standin_loss, train_dataset=dataset)
  print(f"WORKER process={jax.process_index()} stopped={result.stopped} step={result.step}",
        flush=True)


if __name__ == "__main__":
  main()
