"""The network: ViT and text towers, the fused head, and the title tokenizer.

`build_model(config.model)` gives the `EssprModel` whose one call yields the
{'i', 't', 'm'} embeddings; see docs/model.md.
"""
from esspr_jax.models.model import (
    MODALITIES, EssprModel, build_model, count_params, example_side, init_params)
from esspr_jax.models.tokenizer import Tokenizer, tokenizer_from_config

__all__ = ["MODALITIES", "EssprModel", "build_model", "count_params", "example_side",
           "init_params", "Tokenizer", "tokenizer_from_config"]
