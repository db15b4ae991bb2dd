"""The config package is a leaf, rejects keys nothing reads, and agrees with the code it names."""
import ast
import pathlib

import pytest

from esspr_jax import config as config_lib
from esspr_jax.config import constants
from esspr_jax.config.data import WORLD_CATEGORY_STYLES
from esspr_jax.errors import ConfigError

CONFIG_DIR = pathlib.Path(config_lib.__file__).parent


def _imported_modules(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
    elif isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)


def test_no_config_module_imports_another_esspr_jax_package():
  outside = {(path.name, module) for path in CONFIG_DIR.glob("*.py")
             for module in _imported_modules(path)
             if module.startswith("esspr_jax") and not module.startswith("esspr_jax.config")
             and module != "esspr_jax.errors"}
  assert not outside


@pytest.mark.parametrize("key", ["train.eval_every", "data.world.num_stlyes", "eval.index.depth",
                                 "data.pipeline.augment.hue", "train.mesh.pipeline", "trian"])
def test_a_key_nothing_reads_is_an_error_naming_it(key):
  config = config_lib.compose("tiny")
  config.unlock()
  *parents, leaf = key.split(".")
  section = config
  for name in parents:
    section = section[name]
  section[leaf] = 0
  with pytest.raises(ConfigError) as err:
    config_lib.validate_config(config)
  assert err.value.key == key


def test_every_shipped_config_validates():
  configs = sorted((CONFIG_DIR.parents[1] / "configs").glob("*.py"))
  assert len(configs) >= 5
  for path in configs:
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102
    try:
      config_lib.validate_config(namespace["get_config"]())
    except ConfigError as err:
      # Configs that start from a downloaded checkpoint (docs/pretrained.md) validate
      # everything else first; only the absent download may be reported.
      assert err.key.endswith("init_from.path") and "does not exist" in str(err), (path, err)


def test_world_category_sizes_match_the_demo_world():
  from esspr_jax.demo_world import world_vocab  # noqa: PLC0415
  assert WORLD_CATEGORY_STYLES == {c.name: c.num_combinations for c in world_vocab.CATEGORIES}


def test_shared_names_are_the_ones_the_code_uses():
  from esspr_jax.input import images  # noqa: PLC0415
  from esspr_jax.models import model  # noqa: PLC0415
  assert model.MODALITIES is constants.MODALITIES
  for mode in constants.RESIZE_MODES:
    assert images.fit_square(images.Image.new("RGB", (20, 10)), 8, mode).shape == (8, 8, 3)
