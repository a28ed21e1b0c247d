"""The optimizer's decay mask, freezing and per-group learning-rate multipliers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clipzoo_jax import config_base, optim
from tests import helpers


def _optim_config(**overrides):
  config = config_base.base_config().optim
  config.warmup_steps = 0
  config.grad_clip_norm = 0.0
  for key, value in overrides.items():
    config[key] = value
  return config


def test_decay_mask_excludes_norms_biases_embeddings_and_temperature():
  _, params = helpers.init_params(helpers.tiny_config())
  mask = optim.decay_mask(params)
  assert mask["img"]["encoder"]["block_0"]["mlp"]["fc"]["kernel"]
  assert mask["img"]["embedding"]["kernel"]            # patch projection is a matmul weight
  assert mask["heads"]["seg_head"]["conv_in"]["kernel"]
  assert not mask["img"]["encoder"]["block_0"]["mlp"]["fc"]["bias"]
  assert not mask["img"]["ln_pre"]["scale"]
  assert not mask["heads"]["seg_head"]["ln"]["scale"]
  assert not mask["txt"]["token_embedding"]["embedding"]
  assert not mask["txt"]["pos_embedding"] and not mask["img"]["cls_token"]
  assert not mask["logit_scale"]


def _one_update(config, params):
  tx, _ = optim.make_optimizer(config, params, total_steps=10)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_frozen_parameters_never_move_and_do_not_count_in_the_clip_norm():
  _, params = helpers.init_params(helpers.tiny_config())
  config = _optim_config(freeze=[r"^txt/"], grad_clip_norm=1.0, weight_decay=0.1)
  updates = _one_update(config, params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["txt"]))
  assert float(jnp.abs(updates["img"]["proj"]["kernel"]).max()) > 0
  # the clip norm is computed without the frozen tower: an unfrozen-only run clips identically
  img_only = {k: v for k, v in params.items() if k != "txt"}
  reference = _one_update(_optim_config(grad_clip_norm=1.0, weight_decay=0.1), img_only)
  np.testing.assert_allclose(updates["img"]["proj"]["kernel"], reference["img"]["proj"]["kernel"],
                             rtol=1e-6)


def test_lr_multipliers_scale_updates_exactly():
  _, params = helpers.init_params(helpers.tiny_config())
  plain = _one_update(_optim_config(), params)
  scaled = _one_update(_optim_config(lr_multipliers=[[r"^heads/", 10.0], [r"^img/", 0.1]]), params)
  np.testing.assert_allclose(scaled["heads"]["seg_head"]["conv_out"]["kernel"],
                             10.0 * plain["heads"]["seg_head"]["conv_out"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(scaled["img"]["proj"]["kernel"],
                             0.1 * plain["img"]["proj"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(scaled["txt"]["proj"]["kernel"], plain["txt"]["proj"]["kernel"])


def test_adamw_matches_optax_adamw_on_decayed_weights():
  params = {"dense": {"kernel": jnp.ones((3, 3))}}
  config = _optim_config(learning_rate=0.1, weight_decay=0.2)
  ours = _one_update(config, params)
  schedule = optim.learning_rate_schedule(config, 10)
  reference = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                          weight_decay=0.2)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
  expected, _ = reference.update(grads, reference.init(params), params)
  np.testing.assert_allclose(ours["dense"]["kernel"], expected["dense"]["kernel"], rtol=1e-6)


def test_pattern_matching_nothing_is_an_error():
  _, params = helpers.init_params(helpers.tiny_config())
  with pytest.raises(ValueError, match=r"optim.freeze.*'\^tower/'"):
    optim.make_optimizer(_optim_config(freeze=["^tower/"]), params, 10)
