"""config.eval: every preset validates; bad values name their dotted key."""
import pytest

from esspr_jax.config import compose
from esspr_jax.config import eval as eval_config
from esspr_jax.errors import ConfigError


@pytest.mark.parametrize("preset", ["tiny", "demo", "base", "large"])
def test_presets_validate(preset):
  eval_config.validate(compose(preset))


@pytest.mark.parametrize("key,value,match", [
    ("settings", "i-x", "eval.settings"),
    ("ks", (5, 1), "eval.ks"),
    ("index.search_depth", 10, "eval.index.search_depth: 10 is below"),
    ("index.scann.target_recall", 1.5, "eval.index.scann.target_recall"),
    ("index.scann.leaves_fractions", (0.5, 0.1), "eval.index.scann.leaves_fractions"),
    ("export.modalities", "m,m", "eval.export.modalities"),
    ("export.dtype", "int8", "eval.export.dtype"),
    ("export.rebuild_fraction", 1.5, "eval.export.rebuild_fraction"),
    ("search.duplicate_threshold", 2.0, "eval.search.duplicate_threshold"),
    ("batch_size", 0, "eval.batch_size"),
])
def test_bad_values_name_the_key(key, value, match):
  config = compose("tiny")
  node = config.eval
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value   # existing keys stay assignable in a locked config
  with pytest.raises(ConfigError, match=match):
    eval_config.validate(config)


def test_settings_parsing():
  assert eval_config.parse_settings("paper") == ("i-i", "i-t", "i-m", "t-i", "t-t", "t-m", "m-m")
  assert len(eval_config.parse_settings("all")) == 9
  assert eval_config.parse_settings(" m-m , i-i ") == ("m-m", "i-i")
