"""The optimizer: optax AdamW with warmup + cosine, a weight-decay mask, gradient clipping,
per-parameter-group learning-rate multipliers and freezing, all chosen by regex on param paths."""

from __future__ import annotations

import logging
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clipzoo_jax import cli

# No decay on norms, biases, embeddings (token, position, class) and the temperature.
NO_DECAY_PATTERNS = (r"(^|/)bias$", r"(^|/)scale$", r"(^|/)ln[^/]*/", r"embedding$",
                     r"pos_embedding$", r"cls_token$", r"^logit_scale$")


def param_paths(params) -> dict:
  """Same-structure tree of 'a/b/c' path strings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), params)


def decay_mask(params):
  no_decay = [re.compile(p) for p in NO_DECAY_PATTERNS]
  return jax.tree.map(lambda path: not any(p.search(path) for p in no_decay), param_paths(params))


def frozen_mask(params, patterns: Sequence[str]):
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda path: any(p.search(path) for p in compiled), param_paths(params))


def lr_multipliers(params, rules: Sequence[Sequence]) -> dict:
  """Per-parameter multiplier: the first matching (regex, multiplier) rule wins, else 1.0."""
  compiled = [(re.compile(pattern), float(mult)) for pattern, mult in rules]

  def pick(path):
    return next((mult for pattern, mult in compiled if pattern.search(path)), 1.0)
  return jax.tree.map(pick, param_paths(params))


def check_patterns_match(params, config: ml_collections.ConfigDict) -> None:
  """A regex that matches no parameter is almost always a typo: fail before training."""
  paths = jax.tree.leaves(param_paths(params))
  for field, patterns in (("optim.freeze", list(config.get("freeze", []))),
                          ("optim.lr_multipliers", [p for p, _ in config.get("lr_multipliers", [])])):
    for pattern in patterns:
      if not any(re.search(pattern, path) for path in paths):
        raise cli.UserError(f"config.{field}: pattern {pattern!r} matches no parameter; "
                         f"parameter paths look like {paths[:3]}")


def schedule_steps(optim_config: ml_collections.ConfigDict, total_steps: int) -> int:
  """The length of the learning-rate schedule: `optim.schedule_steps`, or the run's total steps
  when it is 0. Pinning it lets a finished run be extended at its final learning rate."""
  return int(optim_config.get("schedule_steps") or total_steps)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> Callable:
  total_steps = schedule_steps(config, total_steps)
  warmup = int(config.get("warmup_steps", 0))
  if warmup >= total_steps:  # e.g. a short run from --config.total_steps=10
    logging.warning("config.optim.warmup_steps %d >= total_steps %d: warming up for %d steps",
                    warmup, total_steps, total_steps // 10)
    warmup = total_steps // 10
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=total_steps, end_value=config.learning_rate * config.get("end_lr_factor", 0.0))


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
  return optax.stateless(lambda updates, params: jax.tree.map(
      lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers))


def make_optimizer(config: ml_collections.ConfigDict, params, total_steps: int):
  """(optax transformation, schedule). `params` may be abstract (shapes only)."""
  check_patterns_match(params, config)
  schedule = learning_rate_schedule(config, total_steps)
  frozen = frozen_mask(params, list(config.get("freeze", [])))
  labels = jax.tree.map(lambda f: "frozen" if f else "trainable", frozen)
  adamw = optax.chain(
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask(params)),
      optax.scale_by_learning_rate(schedule))
  transforms = [optax.masked(optax.set_to_zero(), frozen)]  # frozen grads don't count in the clip
  if config.get("grad_clip_norm"):
    transforms.append(optax.clip_by_global_norm(config.grad_clip_norm))
  transforms.append(optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()},
                                          labels))
  rules = list(config.get("lr_multipliers", []))
  if rules:
    transforms.append(_scale_by_tree(lr_multipliers(params, rules)))
  return optax.chain(*transforms), schedule
