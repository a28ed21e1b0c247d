"""Parameters, optimizer state and batches land on the mesh as the logical rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clipzoo_jax import run, sharding
from tests import helpers


def test_mesh_shape_fills_and_rejects_bad_sizes():
  assert sharding.mesh_shape([-1, 2, 1], 8) == (4, 2, 1)
  assert sharding.mesh_shape([2, -1, 2], 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.mesh_shape([3, -1, 1], 8)
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.mesh_shape([2, 2, 1], 8)
  assert run.shrink_mesh_to_fit([-1, 2, 1], 1) == [-1, 1, 1]


def _state(config, mesh_sizes, devices=None):
  run = helpers.run_on(config, mesh_sizes, devices)
  return run.init_state(), run.state_shardings


def test_params_and_adam_moments_are_sharded_by_rules():
  config = helpers.tiny_config()
  state, _ = _state(config, [2, 2, 2])
  query = state["params"]["img"]["encoder"]["block_0"]["attn"]["query"]["kernel"]
  assert query.sharding.spec == P("fsdp", "tensor", None)       # (embed, heads, kv)
  fc = state["params"]["txt"]["encoder"]["block_1"]["mlp"]["fc"]["kernel"]
  assert fc.sharding.spec == P("fsdp", "tensor")                # (embed, mlp)
  # each device holds 1/4 of the kernel: fsdp(2) x tensor(2)
  assert fc.addressable_shards[0].data.size * 4 == fc.size
  adam = state["opt_state"][2].inner_states["trainable"].inner_state[0]
  mu = adam.mu["txt"]["encoder"]["block_1"]["mlp"]["fc"]["kernel"]
  assert mu.sharding.spec == fc.sharding.spec
  assert state["step"].sharding.spec == P()


def test_config_rules_override_defaults():
  config = helpers.tiny_config(sharding_rules=[["embed", None], ["mlp", "fsdp"]])
  state, _ = _state(config, [2, 2, 2])
  fc = state["params"]["txt"]["encoder"]["block_1"]["mlp"]["fc"]["kernel"]
  assert fc.sharding.spec == P(None, "fsdp")


def test_sharded_init_equals_single_device_init():
  config = helpers.tiny_config()
  state8, _ = _state(config, [2, 2, 2])
  state1, _ = _state(config, [1, 1, 1], devices=jax.devices()[:1])
  for a, b in zip(jax.tree.leaves(state8["params"]), jax.tree.leaves(state1["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
