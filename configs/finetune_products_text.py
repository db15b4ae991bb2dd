"""Fine-tune all-MiniLM-L6-v2 on real product-matching pairs (text only, t->t).

Run it with the recipe, which prepares the data and evaluates before and after:
    python -m esspr_jax.recipes.finetune_products_text --workdir=/tmp/ft_products

The model is exactly sentence-transformers' all-MiniLM-L6-v2 at step 0: the pinned
BERT tower (6 x 384, post-LN), a fused head with no layers and no projections that
mean-pools the token states over the mask and L2-normalises. Training: in-batch
InfoNCE on t->t pairs (every other recall of the global batch is a negative, and
one mined hard negative per pair, refreshed every 30 steps), with
the inverse temperature starting at 20 as in sentence-transformers'
MultipleNegativesRankingLoss; AdamW at 2e-5 with warmup, sized to finish in minutes
on 2 CPU cores. `recipe.*` holds what the recipe (not the trainer) reads (defaults and checks:
`default_recipe` / `validate_recipe` in the recipe module).
"""
import math

from esspr_jax.config import compose
from esspr_jax.config import loss as loss_section
from esspr_jax.models import pretrained
from esspr_jax.recipes.finetune_products_text import default_recipe

SEQ_LEN = 40  # covers 99% of the titles of these sets (max 73 word pieces)


def get_config():
  config = compose("demo")
  folder = pretrained.minilm_dir(verify=False)  # verified when the weights are loaded
  init_from = pretrained.default_init_from("text")
  init_from.update(path=pretrained.MINILM_NAME, format="hf_bert", sha256=pretrained.MINILM_SHA256)
  with config.unlocked():
    m = config.model
    m.image.enabled = False
    m.text.update(pretrained.hf_text_config(folder))
    m.text.max_positions = SEQ_LEN  # the checkpoint's 512 rows are truncated (exact)
    m.fused.update(num_layers=0, pool="mean", input_proj=False, output_proj=False,
                   width=m.text.width)
    m.embed_dim = m.text.width
    m.dropout = 0.1  # MiniLM's own training dropout
    m.logit_scale_init = math.log(20.0)
    m.tokenizer.update(kind="vocab_txt", path=str(folder / "vocab.txt"), max_len=SEQ_LEN,
                       lowercase=True, strip_accents=True)
    m.text.init_from = init_from  # applied by the trainer (and by the recipe's "before")

    loss_section.text_only_infonce(config.loss)  # no photos here: no image or composed terms

    t = config.train
    t.batch_size = 64
    t.steps = 90  # ~3 epochs of the ~1,850 training pairs
    t.optimizer.learning_rate = 2e-5
    t.optimizer.weight_decay = 0.01
    t.schedule.name = "warmup_cosine"
    t.schedule.warmup_steps = 9
    t.schedule.end_lr_ratio = 0.1
    t.log_every = 10
    t.checkpoint.every = 90
    t.checkpoint.keep = 1
    # Hard negatives (on: docs/results.md, "Text recipe", has the table): every 30
    # steps the training titles are re-embedded and each pair's nearest non-positive
    # of its own set and leaf category joins the loss as an extra negative.
    t.hard_negatives.enabled = True
    t.hard_negatives.every_steps = 30
    t.hard_negatives.per_trigger = 1
    config.eval.every_steps = 0  # the recipe evaluates itself, before and after
    t.eval_at_end = False

    config.data.pipeline.augment.enabled = False  # no images
    config.data.pipeline.worker_count = 0  # tokenising titles needs no worker processes
    config.recipe = default_recipe()  # data root, splits, validation, hybrid grid
  return config
