"""The `base` preset (ViT-B/16 + BERT-base, global batch 4096), sized for a Cloud TPU v4-32.

16 v4 chips (4 hosts x 4), 32 GiB HBM each, 256 examples per chip, plain data
parallelism. Override any key from the command line, e.g. --config.train.steps=10.
Check it with `esspr-jax --config=configs/base.py --mode=compile --topology=v4:2x2x4
--workdir=runs/check`.
"""
from esspr_jax.config import compose

TOPOLOGY = "v4:2x2x4"  # v4-32: 16 chips (benchmarks/aot_topologies.py)


def get_config():
  return compose("base")
