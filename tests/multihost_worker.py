"""One process of a multi-process trainer run, for tests/test_multihost.py (not a test).

Started once per process (by launch.local_multiprocess, or directly for one process):
joins the run with `esspr_jax.distributed.initialize()`, then, in order and each only
if asked:
1. --restore_from: restores the newest train state under another run's checkpoints
   (state only, replicated on this run's mesh; any process count) -> --restore_dump;
2. --resumed_dump: runs the trainer up to the newest checkpoint of --workdir, i.e.
   only restores (onto this run's mesh, through `train.train`), and dumps that state;
3. trains the `tiny` config through `esspr_jax.train.train` up to --steps -> --dump:
   with the stand-in model and loss (tests/standin.py), or with --model=tiny the real
   model and the default loss unit (the paper's terms) on random in-memory batches
   in the model's input format (tests/model_batches.py); --grad_accum_steps sets
   train.grad_accum_steps.
Dumps are .npz files of params + optimizer state, gathered, written by process 0,
keyed by tree path. Every process feeds only the rows of each global batch that its
devices hold, exactly as a per-process Grain shard would. --stall_process/
--stall_at_batch make one process hang before a batch (so a test can kill it).
"""
import argparse
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from esspr_jax import distributed  # noqa: E402

distributed.initialize()  # before anything touches a device

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import model_batches  # noqa: E402
import standin  # noqa: E402
import support  # noqa: E402
from esspr_jax import sharding, train  # noqa: E402
from esspr_jax.config import compose  # noqa: E402


def parse_args():
  parser = support.worker_parser(default_steps=5)
  parser.add_argument("--checkpoint_every", type=int, default=5)
  parser.add_argument("--mesh", default="8,1,1", help="data,fsdp,tensor")
  parser.add_argument("--dump", default=None, help=".npz of the final state (process 0)")
  parser.add_argument("--restore_from", default=None, help="another run's workdir")
  parser.add_argument("--restore_dump", default=None)
  parser.add_argument("--resumed_dump", default=None)
  parser.add_argument("--stall_process", type=int, default=-1)
  parser.add_argument("--stall_at_batch", type=int, default=-1)
  parser.add_argument("--model", choices=("standin", "tiny"), default="standin",
                      help="the stand-in model and loss, or the real tiny model + loss unit")
  parser.add_argument("--grad_accum_steps", type=int, default=1)
  return parser.parse_args()


def build_config(args):
  config = compose("tiny")
  config.train.steps = args.steps
  config.train.log_every = 1
  config.train.checkpoint.every = args.checkpoint_every
  config.train.schedule.warmup_steps = min(config.train.schedule.warmup_steps, args.steps)
  config.train.eval_at_end = False
  config.train.grad_accum_steps = args.grad_accum_steps
  data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
  config.train.mesh.data, config.train.mesh.fsdp, config.train.mesh.tensor = data, fsdp, tensor
  return config


def local_rows(config) -> slice:
  """The rows of each global batch that this process's devices hold."""
  mesh = sharding.make_mesh(config.train)
  batch_sharding = sharding.batch_sharding(mesh, sharding.rules(config.train))
  global_rows = config.train.batch_size
  starts, stops = [], []
  for index in batch_sharding.addressable_devices_indices_map((global_rows,)).values():
    rows = index[0]
    starts.append(rows.start or 0)
    stops.append(global_rows if rows.stop is None else rows.stop)
  start, stop = min(starts), max(stops)
  assert stop - start == global_rows // jax.process_count(), (start, stop)
  return slice(start, stop)


def _key_name(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flat(tree) -> dict:
  """{'opt_state/1/0/mu/bias': array, ...}: the same names for optax's named tuples
  and for the plain dicts/lists that checkpoint metadata restores into."""
  return {"/".join(_key_name(e) for e in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def dump(path, state, step) -> None:
  """Gathers {params, opt_state} to every process; process 0 writes it."""
  gathered = multihost_utils.process_allgather(
      {"params": state["params"], "opt_state": state["opt_state"]}, tiled=True)
  if distributed.is_primary():
    np.savez(path, step=step, **flat(gathered))


def restore_replicated(workdir, config):
  """The newest train state under `workdir`, read with no knowledge of the mesh or
  process count that saved it, replicated over this run's devices."""
  checkpoints = pathlib.Path(workdir) / "checkpoints"
  step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  checkpointer = ocp.StandardCheckpointer()
  item = checkpoints / str(step) / "state"
  tree = checkpointer.metadata(item).item_metadata.tree
  replicated = sharding.replicated(sharding.make_mesh(config.train))
  is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), tree,
      is_leaf=is_leaf)
  return checkpointer.restore(item, target), step


def stalling(index, batch, args):
  if jax.process_index() == args.stall_process and index == args.stall_at_batch:
    print(f"WORKER_STALL process={jax.process_index()} batch={index}", flush=True)
    time.sleep(600)
  return batch


def state_of(result) -> dict:
  return {"params": result.state.params, "opt_state": result.state.opt_state}


def global_batches(config, args) -> grain.MapDataset:
  if args.model == "standin":
    return standin.dataset(config.train.batch_size)
  return grain.MapDataset.range(1_000_000).map(
      lambda i: model_batches.make_batch(config.model, int(i), config.train.batch_size))


def run_trainer(config, args):
  rows = local_rows(config)
  dataset = (global_batches(config, args)
             .map(lambda batch: jax.tree_util.tree_map(lambda x: x[rows], batch))
             .map_with_index(lambda i, b: stalling(i, b, args)))
  if args.model == "tiny":  # train's defaults: build_model(config.model), loss_unit
    return train.train(config, args.workdir, train_dataset=dataset)
  return train.train(config, args.workdir, model=standin.StandInModel(),
                     loss_fn=standin.standin_loss, train_dataset=dataset)


def main():
  args = parse_args()
  config = build_config(args)
  if args.restore_from:
    state, step = restore_replicated(args.restore_from, config)
    dump(args.restore_dump, state, step)
  if args.resumed_dump:
    checkpoints = pathlib.Path(args.workdir) / "checkpoints"
    args_at_latest = argparse.Namespace(**{**vars(args), "steps": max(
        int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())})
    result = run_trainer(build_config(args_at_latest), args)
    dump(args.resumed_dump, state_of(result), result.step)
  result = run_trainer(config, args)
  if args.dump:
    dump(args.dump, state_of(result), result.step)
  print(f"WORKER_DONE process={jax.process_index()} step={result.step}", flush=True)


if __name__ == "__main__":
  main()
