"""SigLIP ViT-B/16 at 224 px in both towers (Hugging Face `google/siglip-base-patch16-224`,
or the big_vision `.npz` of the same model).

At step 0 the model's `i` and `t` are SigLIP's own image and text embeddings (the dual
views of models/dual_head.py); `m` is their normalised sum until training opens the
fused head's gate. Titles are padded to 64 tokens, as SigLIP was trained.

    python -m esspr_jax.main --config=configs/siglip_b16.py:/models/siglip-base-patch16-224 \
        --workdir=/tmp/siglip_run

The part after ':' is the checkpoint folder (model.safetensors + tokenizer.json converted
from spiece.model; commands in docs/pretrained.md). For the big_vision checkpoint:
    --config.model.image.init_from.format=big_vision_siglip \
    --config.model.image.init_from.path=/models/webli_en_b16_224_63724782.npz \
    (and the same two for model.text.init_from)
"""
from esspr_jax.config.dual_towers import compose_dual

DEFAULT_DIR = "/models/siglip-base-patch16-224"


def get_config(folder: str = DEFAULT_DIR):
  folder = folder or DEFAULT_DIR
  # SigLIP B/16 has no image projection: embed_dim is the MAP head's 768 outputs; it
  # was trained with the sigmoid loss.
  return compose_dual(
      folder, init_format="hf_siglip", pair_kind="sigmoid", embed_dim=768,
      image=dict(kind="siglip_vit", size=224, patch=16, width=768, depth=12, heads=12,
                 mlp_dim=3072, cls_token=False, mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5), ln_eps=1e-6, act="gelu_tanh"),
      text=dict(kind="siglip", vocab_size=32000, max_positions=64, width=768,
                depth=12, heads=12, mlp_dim=3072, norm="pre", ln_eps=1e-6,
                act="gelu_tanh", pooler=False),
      tokenizer=dict(kind="siglip", path=f"{folder}/tokenizer.json", max_len=64,
                     vocab_size=32000, lowercase=True))
