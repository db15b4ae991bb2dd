"""A `base` run whose two towers come from one pretrained dual encoder (CLIP, SigLIP).

What such configs share: both towers load from the same checkpoint folder, the fused
head is the dual head (models/dual_head.py: at step 0 `i` and `t` are the checkpoint's
own embeddings), and every enabled pair uses the loss the checkpoint was trained with.
What differs (tower shapes, tokenizer, projection width) is the caller's.
"""
import ml_collections

from esspr_jax.config import compose


def compose_dual(folder: str, *, init_format: str, pair_kind: str, embed_dim: int,
                 image: dict, text: dict, tokenizer: dict) -> ml_collections.ConfigDict:
  """The `base` preset with both towers from `folder` (read as `init_format`)."""
  config = compose("base")
  with config.unlocked():
    m = config.model
    m.embed_dim = embed_dim
    m.image.update(image)
    m.text.update(text)
    m.fused.update(dual=True, num_layers=2, width=768, heads=12, mlp_dim=3072, pool="cls")
    m.tokenizer.update(tokenizer)
    for tower in ("image", "text"):
      m[tower].init_from.update(path=folder, format=init_format)
    for pair in config.loss.pairs.keys():
      if config.loss.pairs[pair].weight:
        config.loss.pairs[pair].kind = pair_kind
  return config
