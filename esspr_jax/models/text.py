"""BERT-compatible text tower: title token ids -> token states (and a pooled vector).

Param tree (names and shapes are a contract with models/pretrained.py; keep them stable).
V = vocab_size, P = max_positions, T = type_vocab_size, D = width, H = heads,
Dh = D / H, F = mlp_dim. Logical axis names in brackets.

  token_embed/embedding      [V, D]      (vocab, embed)       BERT word_embeddings
  position_embed/embedding   [P, D]      (pos, embed)         BERT position_embeddings
  type_embed/embedding       [T, D]      (type, embed)        BERT token_type_embeddings
  embed_norm/{scale,bias}    [D]         (embed)              BERT embeddings.LayerNorm
  encoder/layer_{i}/                                          BERT encoder.layer.{i}
    attn/query|key|value/kernel [D, H, Dh], bias [H, Dh]      attention.self.* (weight.T reshaped)
    attn/out/kernel          [H, Dh, D], bias [D]             attention.output.dense
    norm_attn/{scale,bias}   [D]                              attention.output.LayerNorm
    mlp/fc_in/kernel         [D, F], bias [F]                 intermediate.dense
    mlp/fc_out/kernel        [F, D], bias [D]                 output.dense
    norm_mlp/{scale,bias}    [D]                              output.LayerNorm
  final_norm/{scale,bias}    [D]         only with norm='pre'
  pooler/{kernel [D, D], bias [D]}       only with pooler=True  BERT pooler.dense (tanh)

With scan=True the blocks live under `encoder/layers/` with a leading [depth] axis.
Token-type ids are all 0 (titles are single sequences), as BERT does for one segment.
`norm='post'` is BERT's layout (LayerNorm after each residual add); `norm='pre'`
puts it before each sub-block and adds `final_norm`.

`kind` (config `model.text.kind`) picks the layout of a dual encoder's text tower:
  'bert'    as above; pooled = token 0 ([CLS]), through `pooler` if set.
  'clip'    CLIP: no type_embed, no embed_norm, pre-LN (norm='pre') with final_norm,
            causal attention; pooled = the last real token (EOS: position sum(mask) - 1).
  'siglip'  SigLIP: no type_embed, no embed_norm, pre-LN with final_norm; attention sees
            every position, padding included, as SigLIP was trained (titles padded to
            max_len); pooled = the last position.
`act` is the MLP activation ('gelu' exact, 'gelu_tanh', 'quick_gelu').
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from esspr_jax.models.encoder import Encoder, remat_setting
from esspr_jax.models.layers import Embedding, compute_dtype, constrain, dense, layer_norm

TEXT_KINDS = ("bert", "clip", "siglip")


class TextTower(nn.Module):
  """Token ids [B,L] + mask [B,L] -> (states [B,L,D], pooled [B,D])."""
  vocab_size: int
  max_positions: int
  type_vocab_size: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  norm: str = "post"
  ln_eps: float = 1e-12
  pooler: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  remat: bool | str = False  # Encoder.remat
  scan: bool = False
  kind: str = "bert"
  act: str = "gelu"

  @classmethod
  def from_config(cls, model_config, name: str = "text") -> "TextTower":
    t = model_config.text
    return cls(vocab_size=t.vocab_size, max_positions=t.max_positions,
               type_vocab_size=t.type_vocab_size, width=t.width, depth=t.depth, heads=t.heads,
               mlp_dim=t.mlp_dim, norm=t.norm, ln_eps=t.ln_eps, pooler=t.pooler,
               kind=t.kind, act=t.act,
               dropout=model_config.dropout, dtype=compute_dtype(model_config.dtype),
               remat=remat_setting(model_config), scan=model_config.scan, name=name)

  def _embed(self, num: int, names, name: str) -> Embedding:
    # Embedding sums stay float32 (as in BERT); embed_norm casts to the compute dtype.
    return Embedding(num, self.width, names, jnp.float32, name=name)

  @nn.compact
  def __call__(self, text_ids: jax.Array, text_mask: jax.Array, train: bool = False):
    length = text_ids.shape[1]
    if length > self.max_positions:
      raise ValueError(f"text length {length} exceeds "
                       f"model.text.max_positions={self.max_positions}")
    x = self._embed(self.vocab_size, ("vocab", "embed"), "token_embed")(text_ids)
    x = constrain(x, ("batch", "seq", "act_embed"))
    x = x + self._embed(self.max_positions, ("pos", "embed"), "position_embed")(
        jnp.arange(length))[None]
    if self.kind not in TEXT_KINDS:
      raise ValueError(f"kind must be one of {TEXT_KINDS}, got {self.kind!r}")
    if self.kind == "bert":
      x = x + self._embed(self.type_vocab_size, ("type", "embed"), "type_embed")(
          jnp.zeros((1, 1), jnp.int32))
      x = layer_norm(self.ln_eps, self.dtype, "embed_norm")(x)
    else:
      x = x.astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = constrain(x, ("batch", "seq", "act_embed"))
    key_mask = None if self.kind == "siglip" else text_mask.astype(bool)
    x = Encoder(self.depth, self.heads, self.mlp_dim, norm=self.norm, ln_eps=self.ln_eps,
                dropout=self.dropout, dtype=self.dtype, remat=self.remat, scan=self.scan,
                act=self.act, causal=self.kind == "clip", name="encoder")(x, key_mask, train)
    if self.norm == "pre":
      x = layer_norm(self.ln_eps, self.dtype, "final_norm")(x)
    if self.kind == "clip":
      last = jnp.maximum(jnp.sum(text_mask.astype(jnp.int32), axis=1) - 1, 0)
      pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    elif self.kind == "siglip":
      pooled = x[:, -1]
    else:
      pooled = x[:, 0]
    if self.pooler:
      pooled = jnp.tanh(dense(self.width, ("embed", "proj"), self.dtype, "pooler")(pooled))
    return x, pooled
