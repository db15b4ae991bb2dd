"""The `base` preset on nodes of 8 GPUs (e.g. 8 x H100 80 GiB per node, NVLink inside).

The base model's weights and Adam state fit on each GPU many times over, so plain
data parallelism is fastest: every GPU of every node takes a slice of the batch
(`data` = all devices), gradients are all-reduced. One node or many, one process per
GPU or per node: the mesh is the same. For the `large` preset, set
`--config.train.mesh.fsdp=8` to shard weights and optimizer state within a node.
Launch with `python -m launch.slurm` or on one node directly (docs/scaling.md).
Check it with `JAX_PLATFORMS=cpu esspr-jax --config=configs/gpu_8x.py --mode=compile
--topology=h100:8 --workdir=runs/check` (needs esspr-jax[cuda12]; no GPU needed).
"""
from esspr_jax.config import compose

TOPOLOGY = "h100:8"  # one node of 8 x H100 80 GB (benchmarks/aot_topologies.py)


def get_config():
  config = compose("base")
  config.train.mesh.update(data=-1, fsdp=1, tensor=1)
  config.train.platform = "gpu"  # a CPU-only JAX is refused (unless --allow_cpu)
  return config
