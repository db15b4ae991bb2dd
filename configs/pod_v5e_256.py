"""The `base` model at SigLIP scale: global batch 32,768 on a v5litepod-256 (64 hosts x 4 chips).

The per-chip batch (128) is pod_v5e.py's; what grows is the loss's gallery: every
example is a negative for all 32,768 queries. The loss scores each device's own query
rows against the gathered gallery in blocks (`loss.chunk_size`), so no chip ever holds
a [32768, 32768] score matrix (docs/losses.md). Weights and optimizer state are
sharded over the 4 chips of a host (FSDP); `data` takes the 64 hosts.
Check it with `esspr-jax --config=configs/pod_v5e_256.py --mode=compile
--topology=v5e:16x16 --workdir=runs/check`.
"""
from esspr_jax.config import compose

TOPOLOGY = "v5e:16x16"  # 256 chips (benchmarks/aot_topologies.py)


def get_config():
  config = compose("base")
  config.train.batch_size = 32768
  config.train.mesh.update(data=-1, fsdp=4, tensor=1)
  config.train.platform = "tpu"  # a CPU-only JAX is refused (unless --allow_cpu)
  return config
