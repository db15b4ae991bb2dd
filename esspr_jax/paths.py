"""Where a run writes (workdir, demo world, datasets, logs), decided once from the
flags: the command line needs it before anything heavy is imported (its log file),
the stages for everything they read and write."""
from __future__ import annotations

import dataclasses
import pathlib

from etils import epath

from esspr_jax import console
from esspr_jax import workdir as workdir_lib


@dataclasses.dataclass
class Paths:
  """Where a run writes; printed at the end of the main job. The workdir may be a
  gs:// URL (an epath); the world and the datasets are local (esspr_jax/workdir.py)."""
  workdir: "epath.Path"
  world: pathlib.Path
  data_dir: pathlib.Path
  logs: pathlib.Path | None = None  # where library logs go (esspr_jax/console.py)

  @property
  def data_per_host(self) -> bool:
    """Each host prepares its own local copy of the data: the workdir is remote."""
    return workdir_lib.is_remote(self.workdir) and not workdir_lib.is_remote(self.data_dir)

  @classmethod
  def of(cls, config, fv=None, *, workdir=None, world_dir=None) -> "Paths":
    """From the flags `fv` (--workdir, --world_dir) or the same two values given."""
    if fv is not None:
      workdir, world_dir = fv.workdir, fv.world_dir
    workdir = workdir_lib.workdir_path(workdir)
    if world_dir:
      world = workdir_lib.local_path(world_dir, "--world_dir")
    elif workdir_lib.is_remote(workdir):
      world = workdir_lib.local_data_root(config) / "world"
    else:
      world = pathlib.Path(workdir) / "world"
    logs = console.default_log_dir(workdir, world.parent)
    return cls(workdir, world, workdir_lib.default_data_dir(config, workdir).absolute(), logs)
