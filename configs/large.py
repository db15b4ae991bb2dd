"""The `large` preset (ViT-L/16 + BERT-large, global batch 16,384) on a Cloud TPU v5p-128.

64 v5p chips (16 hosts x 4), 95 GiB HBM each: 256 examples per chip with every
transformer block rematerialised (the preset's remat). Override any key from the
command line, e.g. --config.train.steps=10. Check it with `esspr-jax
--config=configs/large.py --mode=compile --topology=v5p:4x4x4 --workdir=runs/check`.
"""
from esspr_jax.config import compose

TOPOLOGY = "v5p:4x4x4"  # v5p-128: 64 chips (benchmarks/aot_topologies.py)


def get_config():
  return compose("large")
