"""The device mesh and the logical-to-mesh rules: the only module that knows mesh axes.

The model names the axes of its params and activations logically ('embed', 'mlp',
'batch', ...); `config.train.sharding_rules` maps those names to the mesh axes
`data`, `fsdp`, `tensor`. Everything here is derived from that table, so a new
layout is a config change, never a code change.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from esspr_jax.config.train import MESH_AXES
from esspr_jax.errors import ConfigError


def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) for `num_devices`; a -1 takes what is left."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1:
    raise ConfigError("train.mesh", f"at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(
          "train.mesh", f"the fixed axes {dict(zip(MESH_AXES, sizes))} (product {fixed}) "
          f"do not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        "train.mesh", f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
        f"but {num_devices} are available; set one axis to -1 or make the product match")
  return tuple(sizes)


def make_mesh(train_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(train_config.mesh, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules(train_config) -> tuple:
  """The rules table as flax wants it: ((logical_name, mesh_axes), ...)."""
  out = []
  for name, axes in train_config.sharding_rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def logical_specs(boxed_tree: Any) -> Any:
  """Logical PartitionSpecs of a tree of flax-boxed (logically partitioned) values."""
  return nn.get_partition_spec(boxed_tree)


def mesh_shardings(logical_spec_tree: Any, mesh: Mesh, logical_rules: tuple) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs."""
  return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, logical_rules)


def check_divisible(abstract_tree: Any, sharding_tree: Any, logical_spec_tree: Any) -> None:
  """Raises ConfigError (before compiling) for a dim the rules split unevenly."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
  shardings = jax.tree_util.tree_leaves(
      sharding_tree, is_leaf=lambda x: isinstance(x, NamedSharding))
  specs = jax.tree_util.tree_leaves(
      logical_spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, leaf), sharding, logical in zip(leaves, shardings, specs):
    mesh_shape = sharding.mesh.shape
    for dim, axes in enumerate(sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else axes
      parts = math.prod(mesh_shape[a] for a in axes)
      if leaf.shape[dim] % parts:
        name = logical[dim] if dim < len(logical) else "?"
        raise ConfigError(
            "train.sharding_rules",
            f"param {jax.tree_util.keystr(path)} has shape {leaf.shape}; dim {dim} "
            f"(logical {name!r}) of size {leaf.shape[dim]} cannot be split {parts} ways "
            f"over mesh axes {axes}; change the rule for {name!r} or the mesh")


def batch_sharding(mesh: Mesh, logical_rules: tuple) -> NamedSharding:
  """Sharding of the leading (example) dim of every batch array; the rest replicated."""
  spec = nn.logical_to_mesh_axes(("batch",), logical_rules)
  return NamedSharding(mesh, spec)


def batch_shards(mesh: Mesh, logical_rules: tuple) -> int:
  """How many ways the batch dim is split (the global batch must divide by it)."""
  axes = batch_sharding(mesh, logical_rules).spec[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_batch_axes() -> tuple[str, ...]:
  """The mesh axes the logical 'batch' dim maps to under the flax rules in effect
  (`nn.logical_axis_rules`, as the train step sets them); () outside any rules.

  For code that runs inside a step and must follow the batch split without being
  handed the rules (the loss unit's per-device rows)."""
  axes = nn.logical_to_mesh_axes(("batch",))[0]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(host_batch: Any, sharding: NamedSharding) -> Any:
  """Assembles the global batch from this process's slice of it (one per process)."""
  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree_util.tree_map(put, host_batch)
