"""The device mesh ('data', 'fsdp', 'tensor') and the logical-axis rules that place parameters,
optimizer state, batches and activations on it."""

from __future__ import annotations

import contextlib
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from clipzoo_jax import cli

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Parameters shard `embed` over fsdp and the wide matmul dims over
# tensor; activations shard their batch over (data, fsdp). A config can replace any entry.
DEFAULT_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_seq", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("joint_embed", None),
    ("seq", None),
    ("norm", None),
    ("layers", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", None),
)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry so the product equals num_devices; errors name config.mesh."""
  sizes = list(sizes)
  if len(sizes) != len(MESH_AXES):
    raise cli.UserError(f"config.mesh: expected {len(MESH_AXES)} sizes for {MESH_AXES}, found {sizes}")
  if sizes.count(-1) > 1:
    raise cli.UserError(f"config.mesh: at most one -1 (fill) entry, found {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise cli.UserError(f"config.mesh {sizes}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise cli.UserError(f"config.mesh {tuple(sizes)} has {int(np.prod(sizes))} devices; "
                     f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(sizes: Sequence[int], devices=None) -> Mesh:
  """A Mesh over all (or the given) devices, topology-aware where the platform allows."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(sizes, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(overrides=None) -> tuple:
  """DEFAULT_RULES with entries of `config.sharding_rules` ([(name, axes), ...]) replacing them."""
  rules = dict(DEFAULT_RULES)
  for name, axes in (overrides or ()):
    rules[name] = tuple(axes) if isinstance(axes, list) else axes
  return tuple(rules.items())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """Makes `nn.with_logical_constraint` take effect: flax needs the mesh set with jax.set_mesh
  (under a legacy `with mesh:` the constraints silently do nothing)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_sharding(logical_specs, mesh: Mesh, rules):
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_global_batch(local, mesh: Mesh, batch_partition=BATCH_AXES) -> dict[str, jax.Array]:
  """Global jax.Arrays from each process's local batch (name -> NumPy array), sharded over the
  leading axis. Here rather than in the loader so that a train step fed by other means (synthetic
  batches, benchmarks, another input library) needs no TensorFlow."""
  partition = tuple(batch_partition) if not isinstance(batch_partition, str) else batch_partition
  sharding = NamedSharding(mesh, PartitionSpec(partition))
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local.items()}
