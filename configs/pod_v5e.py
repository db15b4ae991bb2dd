"""The `base` preset laid out for a Cloud TPU v5e pod slice (e.g. v5litepod-32: 8 hosts x 4 chips).

v5e chips have 16 GiB of HBM each and every chip of a slice is on the fast ICI
network, so sharding weights and optimizer state over the 4 chips of a host (FSDP)
costs little and leaves room for the per-chip batch; `data` takes the remaining
chips (8 on a v5litepod-32, 64 on a v5litepod-256). The global batch (4096) must
divide by data x fsdp. Launch with `python -m launch.tpu_pod` (docs/scaling.md).

Checked before booking: `esspr-jax --config=configs/pod_v5e.py --mode=compile
--topology=v5e:4x8 --workdir=runs/check` compiles the real step for the slice
(docs/performance.md, "Fits before you book").
"""
from esspr_jax.config import compose

TOPOLOGY = "v5e:4x8"  # the slice this layout is checked on (benchmarks/aot_topologies.py)


def get_config():
  config = compose("base")
  config.train.mesh.update(data=-1, fsdp=4, tensor=1)
  config.train.platform = "tpu"  # a CPU-only JAX is refused (unless --allow_cpu)
  return config
