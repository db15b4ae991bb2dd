"""A small stand-in model, loss and data for the trainer tests (not part of the package).

It names its params and activations with the same logical axes as the real model, so
sharding rules act on it exactly as on EssprModel, and it compiles in about a second.
The data is a Grain MapDataset of random batches in the contract's batch format.
"""
import grain
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

VOCAB, EMBED, MLP, TEXT_LEN, IMAGE = 32, 16, 32, 6, 3  # 3*3*3 = 27 patch inputs: odd on purpose


def _param(module, name, init, shape, names):
  return module.param(name, nn.with_logical_partitioning(init, names), shape)


class StandInModel(nn.Module):
  """Text: token embedding + MLP, mean-pooled. Image: patch projection. Fused: sum.

  With `nan_on_marker`, a batch holding token id -1 (see `make_batch(nan_at=...)`)
  embeds to NaN, to exercise the non-finite handling."""
  nan_on_marker: bool = False

  @nn.compact
  def __call__(self, side, train: bool = False, modalities=("i", "t", "m")):
    dense = nn.initializers.normal(0.3)
    token_table = _param(self, "token_embedding", dense, (VOCAB, EMBED), ("vocab", "embed"))
    patch_w = _param(self, "patch_kernel", dense, (IMAGE * IMAGE * 3, EMBED),
                     ("patch_in", "embed"))
    up = _param(self, "mlp_in", dense, (EMBED, MLP), ("embed", "mlp"))
    up_b = _param(self, "bias", nn.initializers.zeros, (MLP,), ("mlp",))
    down = _param(self, "mlp_out", dense, (MLP, EMBED), ("mlp", "embed"))
    norm = _param(self, "scale", nn.initializers.ones, (EMBED,), ("embed",))
    self.param("logit_scale", nn.initializers.constant(2.0), ())

    mask = side["text_mask"].astype(jnp.float32)
    tokens = token_table[side["text_ids"]]  # [B, L, E]
    tokens = nn.with_logical_constraint(tokens, ("batch", "seq", "act_embed"))
    hidden = nn.with_logical_constraint(jax.nn.gelu(tokens @ up + up_b),
                                        ("batch", "seq", "act_mlp"))
    tokens = tokens + hidden @ down
    text = (tokens * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    pixels = side["image"].astype(jnp.float32).reshape(side["image"].shape[0], -1) / 255.0
    image = jnp.tanh(pixels @ patch_w)
    unit = lambda x: x * norm / jnp.linalg.norm(x * norm, axis=-1, keepdims=True)
    out = {"i": unit(image), "t": unit(text), "m": unit(image + text)}
    out = {k: v for k, v in out.items() if k in modalities}
    if self.nan_on_marker:
      poisoned = jnp.any(side["text_ids"] < 0)
      out = {k: jnp.where(poisoned, jnp.nan, v) for k, v in out.items()}
    return out


def standin_loss(sides, *, logit_scale=None, logit_bias=None):
  """InfoNCE trigger->recall over the whole (global) batch for m-m and t-m."""
  del logit_bias
  trigger, recall = sides["trigger"], sides["recall"]
  scale = jnp.exp(logit_scale)
  terms = {}
  for q, g in (("m", "m"), ("t", "m")):
    logits = scale * trigger[q] @ recall[g].T
    labels = jnp.arange(logits.shape[0])
    terms[f"infonce/{q}-{g}"] = -jnp.mean(
        jax.nn.log_softmax(logits, axis=-1)[labels, labels])
  total = sum(terms.values())
  return total, terms


def random_side(rng: np.random.Generator, rows: int) -> dict:
  lengths = rng.integers(1, TEXT_LEN + 1, size=rows)
  mask = (np.arange(TEXT_LEN)[None, :] < lengths[:, None]).astype(np.int32)
  return {
      "image": rng.integers(0, 256, size=(rows, IMAGE, IMAGE, 3), dtype=np.uint8),
      "text_ids": (rng.integers(1, VOCAB, size=(rows, TEXT_LEN)) * mask).astype(np.int32),
      "text_mask": mask,
      "text_empty": np.zeros(rows, bool),
  }


def make_batch(index: int, rows: int, nan_at=()) -> dict:
  """Batch `index` (a pure function of it, so resumed runs can be compared)."""
  rng = np.random.default_rng(1000 + index)
  batch = {"trigger": random_side(rng, rows), "recall": random_side(rng, rows),
           "valid": np.ones(rows, bool)}
  if index in nan_at:  # an impossible token id marks a poisoned batch
    batch["trigger"]["text_ids"][0, 0] = -1
  return batch


def dataset(rows: int, nan_at=(), delay: float = 0.0) -> grain.MapDataset:
  def load(index):
    if delay:
      import time
      time.sleep(delay)
    return make_batch(int(index), rows, nan_at)
  return grain.MapDataset.range(1_000_000).map(load)
