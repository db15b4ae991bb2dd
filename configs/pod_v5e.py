"""The `base` preset laid out for a Cloud TPU v5e pod slice (e.g. v5litepod-32: 8 hosts x 4 chips).

v5e chips have 16 GiB of HBM each and every chip of a slice is on the fast ICI
network, so sharding weights and optimizer state over the 4 chips of a host (FSDP)
costs little and leaves room for the per-chip batch; `data` takes the remaining
chips (8 on a v5litepod-32, 64 on a v5litepod-256). The global batch (4096) must
divide by data x fsdp. Launch with `python -m launch.tpu_pod` (docs/scaling.md).
"""
from esspr_jax.config import compose


def get_config():
  config = compose("base")
  config.train.mesh.update(data=-1, fsdp=4, tensor=1)
  config.train.platform = "tpu"  # a CPU-only JAX is refused (unless --allow_cpu)
  return config
