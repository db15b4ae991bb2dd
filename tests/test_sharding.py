"""Mesh and layout: three layouts on 8 virtual devices train like one device."""
import sys
import pathlib

import flax.linen
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import standin  # noqa: E402

from esspr_jax import sharding, train  # noqa: E402
from esspr_jax.config import compose  # noqa: E402
from esspr_jax.errors import ConfigError  # noqa: E402

STEPS = 3


def _config(data, fsdp, tensor):
  config = compose("tiny")
  config.train.steps = STEPS
  config.train.batch_size = 16
  config.train.schedule.warmup_steps = 1
  config.train.optimizer.learning_rate = 1e-2
  config.train.checkpoint.every = 100
  config.train.mesh.data, config.train.mesh.fsdp, config.train.mesh.tensor = data, fsdp, tensor
  return config


def _train(config, workdir, devices=None):
  return train.train(config, workdir, model=standin.StandInModel(),
                     loss_fn=standin.standin_loss, train_dataset=standin.dataset(16),
                     devices=devices)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
  return _train(_config(1, 1, 1), tmp_path_factory.mktemp("single"),
                devices=jax.devices()[:1])


# Expected mesh layout of each stand-in param under the default rules, written out by
# hand: embed->fsdp, mlp/vocab->tensor, everything else replicated.
EXPECTED_SPECS = {
    "token_embedding": P("tensor", "fsdp"),  # (vocab, embed)
    "patch_kernel": P(None, "fsdp"),  # (patch_in, embed)
    "mlp_in": P("fsdp", "tensor"),  # (embed, mlp)
    "bias": P("tensor"),  # (mlp,)
    "mlp_out": P("tensor", "fsdp"),  # (mlp, embed)
    "scale": P("fsdp"),  # (embed,)
    "logit_scale": P(),
}


@pytest.mark.parametrize("layout", [(8, 1, 1), (1, 8, 1), (4, 1, 2)],
                         ids=["data8", "fsdp8", "data4xtensor2"])
def test_layout_matches_single_device(layout, single_device, tmp_path):
  result = _train(_config(*layout), tmp_path)
  assert result.step == STEPS
  mesh_shape = dict(zip(("data", "fsdp", "tensor"), layout))
  for name, param in result.state.params.items():
    assert param.sharding.spec == EXPECTED_SPECS[name], name
    assert dict(param.sharding.mesh.shape) == mesh_shape
    # The shard a device holds is the right fraction of the param.
    expected_shard = list(param.shape)
    for dim, axis in enumerate(EXPECTED_SPECS[name]):
      if axis:
        expected_shard[dim] //= mesh_shape[axis]
    assert param.addressable_shards[0].data.shape == tuple(expected_shard), name
    np.testing.assert_allclose(np.asarray(param), np.asarray(single_device.state.params[name]),
                               atol=1e-5, rtol=1e-5, err_msg=name)
  # And training really moved the params (the comparison is not trivially true).
  assert single_device.last_metrics["lr"] > 0
  np.testing.assert_allclose(result.last_metrics["loss"], single_device.last_metrics["loss"],
                             rtol=1e-5)


def test_training_moved_the_params(single_device):
  """Guards the layout comparison against a no-op trainer: params left their init."""
  init_rng, _ = jax.random.split(jax.random.key(0))
  side = jax.tree_util.tree_map(lambda x: x[:1], standin.make_batch(0, 16)["trigger"])
  initial = train._init_variables(standin.StandInModel(), init_rng, side)["params"]
  initial = flax.linen.unbox(initial)
  moved = max(float(np.max(np.abs(np.asarray(single_device.state.params[k])
                                  - np.asarray(initial[k])))) for k in EXPECTED_SPECS)
  assert moved > 1e-3


def test_resolve_mesh_shape_fills_the_remaining_axis():
  assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
  assert sharding.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


@pytest.mark.parametrize("mesh, message", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices but 8"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "do not divide the 8 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis"),
])
def test_resolve_mesh_shape_rejects_mismatch(mesh, message):
  with pytest.raises(ConfigError, match=message) as info:
    sharding.resolve_mesh_shape(mesh, 8)
  assert info.value.key == "train.mesh"


def test_mesh_mismatch_fails_before_compiling(tmp_path):
  config = _config(2, 2, 1)  # 4 devices for 8
  model = standin.StandInModel()
  with pytest.raises(ConfigError, match="needs 4 devices but 8"):
    train.train(config, tmp_path, model=model, loss_fn=standin.standin_loss,
                train_dataset=standin.dataset(16))
  assert not (tmp_path / "checkpoints").exists()


def test_uneven_split_names_the_param(tmp_path):
  config = _config(4, 1, 2)
  config.train.sharding_rules = (("patch_in", "tensor"),) + tuple(config.train.sharding_rules)
  with pytest.raises(ConfigError, match=r"\['patch_kernel'\].*size 27 cannot be split 2 ways"):
    _train(config, tmp_path)


def test_batch_not_divisible_by_shards(tmp_path):
  config = _config(8, 1, 1)
  config.train.batch_size = 12
  with pytest.raises(ConfigError, match="cannot be split over the 8 batch shards"):
    train.train(config, tmp_path, model=standin.StandInModel(),
                loss_fn=standin.standin_loss, train_dataset=standin.dataset(12))


def test_unknown_rule_names_are_rejected():
  config = _config(8, 1, 1)
  config.train.sharding_rules = (("embd", "fsdp"),)
  with pytest.raises(ConfigError, match="unknown logical axis 'embd'"):
    from esspr_jax.config import validate_config
    validate_config(config)


def test_batch_sharding_follows_rules():
  mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")),)
  assert sharding.batch_sharding(mesh, rules).spec == P(("data", "fsdp"))
  assert sharding.batch_shards(mesh, rules) == 4
  x = sharding.global_batch({"a": np.arange(8 * 3).reshape(8, 3)},
                            sharding.batch_sharding(mesh, rules))["a"]
  assert x.shape == (8, 3)
  assert x.addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(x), np.arange(24).reshape(8, 3))
