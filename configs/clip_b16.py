"""OpenAI CLIP ViT-B/16 in both towers (Hugging Face `openai/clip-vit-base-patch16`).

At step 0 the model's `i` and `t` are CLIP's own image and text embeddings (the dual
views of models/dual_head.py), so it retrieves zero-shot from the first step; `m` is
their normalised sum until training opens the fused head's gate.

    python -m esspr_jax.main --config=configs/clip_b16.py:/models/clip-vit-base-patch16 \
        --workdir=/tmp/clip_run

The part after ':' is the checkpoint folder (model.safetensors + tokenizer.json; the
download command is in docs/pretrained.md); every path is also a plain config value,
e.g. --config.model.tokenizer.path=... Images: resize to 224 px (CLIP centre-crops);
normalised in the model with CLIP's mean / std.
"""
from esspr_jax.config.dual_towers import compose_dual

DEFAULT_DIR = "/models/clip-vit-base-patch16"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(folder: str = DEFAULT_DIR):
  folder = folder or DEFAULT_DIR
  return compose_dual(
      folder, init_format="hf_clip",
      pair_kind="infonce",  # CLIP was trained with InfoNCE
      embed_dim=512,  # CLIP's projection_dim
      image=dict(kind="clip_vit", size=224, patch=16, width=768, depth=12, heads=12,
                 mlp_dim=3072, cls_token=True, mean=CLIP_MEAN, std=CLIP_STD,
                 ln_eps=1e-5, act="quick_gelu"),
      text=dict(kind="clip", vocab_size=49408, max_positions=77, width=512, depth=12,
                heads=8, mlp_dim=2048, norm="pre", ln_eps=1e-5, act="quick_gelu",
                pooler=False),
      tokenizer=dict(kind="clip", path=f"{folder}/tokenizer.json", max_len=77,
                     vocab_size=49408, lowercase=True))
