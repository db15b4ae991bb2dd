"""Every float key of every config section refuses NaN, +-inf and its out-of-range values
with a ConfigError naming it (25.11: `train.optimizer.eps=0` passed and made params NaN)."""
import math

import pytest

from esspr_jax.config import PRESETS, compose, validate_config
from esspr_jax.errors import ConfigError

# key: (an out-of-range value or None where every finite value is allowed, its error)
FLOAT_KEYS = {
    "data.fetch.backoff_s": (-1.0, "must be >= 0 seconds"),
    "data.fetch.connect_timeout_s": (0.0, "must be > 0 seconds"),
    "data.fetch.max_backoff_s": (-1.0, "must be >= 0 seconds"),
    "data.fetch.min_host_interval_s": (-0.5, "must be >= 0 seconds"),
    "data.fetch.read_timeout_s": (0.0, "must be > 0 seconds"),
    "data.fetch.total_timeout_s": (-1.0, "must be > 0 seconds"),
    "data.mining.max_bad_fraction": (1.5, r"must be in \[0, 1\]"),
    "data.mining.min_relevance": (-0.1, r"must be in \[0, 1\]"),
    "data.mining.min_title_overlap": (1.1, r"must be in \[0, 1\]"),
    "data.pipeline.augment.brightness": (1.0, r"must be in \[0, 1\)"),
    "data.pipeline.augment.contrast": (-0.1, r"must be in \[0, 1\)"),
    "data.pipeline.augment.saturation": (1.5, r"must be in \[0, 1\)"),
    "data.pipeline.augment.crop_ratio": ((0.0, 1.0), "needs 0.0 < low <= high"),
    "data.pipeline.augment.crop_scale": ((0.5, 1.5), r"needs 0.0 < low <= high <= 1.0"),
    "data.pipeline.augment.flip_prob": (1.5, r"must be in \[0, 1\]"),
    "data.pipeline.build.max_bad_fraction": (-0.1, r"must be in \[0, 1\]"),
    "data.world.click_prob_related": (1.5, r"must be in \[0, 1\]"),
    "data.world.click_prob_unrelated": (-0.5, r"must be in \[0, 1\]"),
    "data.world.click_prob_wanted": (2.0, r"must be in \[0, 1\]"),
    "data.world.corrupt_row_fraction": (1.5, r"must be in \[0, 1\]"),
    "data.world.eval_style_fraction": (1.0, r"must be in \(0, 1\)"),
    "data.world.noise_result_prob": (1.5, r"must be in \[0, 1\]"),
    "data.world.noise_word_prob": (-0.1, r"must be in \[0, 1\]"),
    "data.world.query_attribute_prob": (1.5, r"must be in \[0, 1\]"),
    "data.world.short_query_prob": (1.5, r"must be in \[0, 1\]"),
    "data.world.typo_prob": (1.5, r"must be in \[0, 1\]"),
    "data.world.watermark_prob": (1.5, r"must be in \[0, 1\]"),
    "data.world.position_bias": (-0.1, "must be >= 0"),
    "data.world.ranking_noise": (-0.1, "must be >= 0"),
    "data.world.relevance_noise": (-0.1, "must be >= 0"),
    "duplicates.target_precision": (0.0, r"must be in \(0, 1\]"),
    "eval.export.rebuild_fraction": (1.5, r"must be a number in \[0, 1\]"),
    "eval.hybrid.weight": (1.5, r"must be in \[0, 1\]"),
    "eval.hybrid.rrf_k": (0.0, "must be > 0"),
    "eval.index.scann.anisotropic_threshold": (1.0, "must be < 1"),
    "eval.index.scann.leaves_fractions": ((0.0, 1.0), r"increasing fractions in \(0, 1\]"),
    "eval.index.scann.target_recall": (0.0, r"must be in \(0, 1\]"),
    "eval.search.duplicate_threshold": (1.5, r"must be in \[-1, 1\]"),
    "loss.composed.weight": (-1.0, "must be finite and >= 0"),
    "loss.max_logit_scale": (-1.0, "must be finite and >= 0"),
    "loss.weighting.alpha": (-1.0, "must be finite and >= 0"),
    **{f"loss.pairs.{x}_{y}.{field}": (-0.1, "must be finite and >= 0")
       for x in "itm" for y in "itm" for field in ("weight", "margin")},
    **{f"loss.{term}.{view}.{field}": (-0.1, "must be finite and >= 0")
       for term in ("pdc", "plc") for view in "it" for field in ("weight", "margin")},
    "model.dropout": (1.0, r"must be in \[0, 1\)"),
    "model.fused.ln_eps": (0.0, "must be > 0"),
    "model.image.ln_eps": (-1e-6, "must be > 0"),
    "model.text.ln_eps": (0.0, "must be > 0"),
    "model.image.mean": (None, ""),
    "model.image.std": ((0.0, 0.5, 0.5), "must be > 0"),
    "model.logit_bias_init": (None, ""),
    "model.logit_scale_init": (None, ""),
    "train.hard_negatives.max_cost_fraction": (1.5, r"must be in \[0, 1\]"),
    "train.optimizer.b1": (1.0, r"must be in \[0, 1\)"),
    "train.optimizer.b2": (-0.1, r"must be in \[0, 1\)"),
    "train.optimizer.clip_norm": (-1.0, "must be >= 0"),
    "train.optimizer.eps": (0.0, "must be > 0"),
    "train.optimizer.learning_rate": (0.0, "must be > 0"),
    "train.optimizer.weight_decay": (-0.01, "must be >= 0"),
    "train.peak_flops": (-1.0, "must be >= 0"),
    "train.schedule.end_lr_ratio": (1.5, r"must be in \[0, 1\]"),
}


def _float_keys(section, prefix=""):
  """Dotted keys whose value is a float or holds floats, in a config."""
  for name in section.keys():
    value, key = section[name], f"{prefix}{name}"
    if hasattr(value, "keys"):
      yield from _float_keys(value, key + ".")
    elif isinstance(value, float) or (isinstance(value, (tuple, list))
                                      and any(isinstance(v, float) for v in value)):
      yield key


def _with(key: str, value):
  config = compose("tiny")
  *parents, leaf = key.split(".")
  section = config
  for name in parents:
    section = section[name]
  with section.ignore_type():
    section[leaf] = value
  return config


def _non_finite(key: str, bad: float):
  """`bad` in place of the key's value (of its first element, for a tuple)."""
  value = compose("tiny")
  for name in key.split("."):
    value = value[name]
  return (bad,) + tuple(value[1:]) if isinstance(value, tuple) else bad


def test_the_table_lists_every_float_key_of_every_preset():
  found = {key for preset in PRESETS for key in _float_keys(compose(preset))}
  assert sorted(found - set(FLOAT_KEYS)) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", sorted(FLOAT_KEYS))
def test_a_non_finite_float_is_refused_naming_its_key(key, bad):
  with pytest.raises(ConfigError, match=rf"config\.{key}: must be finite") as info:
    validate_config(_with(key, _non_finite(key, bad)))
  assert info.value.key == key


@pytest.mark.parametrize("key", sorted(k for k, (v, _) in FLOAT_KEYS.items() if v is not None))
def test_an_out_of_range_float_is_refused_naming_its_key(key):
  value, error = FLOAT_KEYS[key]
  with pytest.raises(ConfigError, match=error) as info:
    validate_config(_with(key, value))
  assert info.value.key == key, str(info.value)
