"""Training losses: the contrastive loss (CLIP's softmax InfoNCE or SigLIP's sigmoid loss, over the
whole global batch, optionally in row chunks), and the total with the dense task losses.

Pure functions of arrays. Each task's loss lives with its task (`clipzoo_jax/tasks/`) as a ratio
`numerator / max(denominator, 1)` over the valid pixels (or boxes, or images) of the whole batch,
0 when nothing in the batch is valid, so an absent label never acts as a zero label; `<task>_mask`
(B,) marks which examples carry that task's label at all. The denominators depend on the labels
only, which is what lets `gradients` split a batch into micro-batches and still compute every loss
of the whole batch.

Memory of the contrastive loss: the global form holds the B x B logits; with
`config.loss.contrastive_chunk = c` the logits are computed c rows at a time (and recomputed in
the backward pass), so the loss holds c x B of them, with the same value and gradient.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from clipzoo_jax import cli
from clipzoo_jax import tasks as task_lib

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature to at most 100
CONTRASTIVE_KINDS = ("softmax", "sigmoid")
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)  # SigLIP's initial temperature t' = log 10 ...
SIGLIP_LOGIT_BIAS_INIT = -10.0            # ... and bias b = -10


def masked_terms(values, weights):
  """(sum of values * weights, sum of weights): the two terms of a masked mean."""
  return jnp.sum(values * weights), jnp.sum(weights)


def ratio(numerator, denominator):
  """numerator / denominator, 0 when the denominator (a count) is 0."""
  return numerator / jnp.maximum(denominator, 1.0)


def masked_mean(values, weights):
  return ratio(*masked_terms(values, weights))


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _scale(logit_scale):
  return jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))


def _chunks(x, chunk_size: int, where: str = "config.loss.contrastive_chunk"):
  """(B, E) -> (B / chunk, chunk, E); chunk_size 0 means one chunk."""
  rows = x.shape[0]
  chunk = rows if not chunk_size else int(chunk_size)
  if chunk <= 0 or rows % chunk:
    raise cli.UserError(f"{where}: {chunk_size} does not divide the batch of {rows} rows "
                        "(use a divisor of the global batch, or 0 for no chunking)")
  return x.reshape(rows // chunk, chunk, *x.shape[1:])


def _map_chunks(fn, chunk_size: int, *arrays):
  """fn over row chunks of `arrays`, rematerialized in the backward pass, results concatenated:
  only one chunk's intermediates are alive at a time."""
  chunked = [_chunks(a, chunk_size) for a in arrays]
  if chunked[0].shape[0] == 1:
    return fn(*arrays)
  out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(chunked))
  return out.reshape(-1, *out.shape[2:])


def contrastive_loss(image_embedding, text_embedding, logit_scale, chunk_size: int = 0):
  """CLIP's symmetric InfoNCE over the batch (the global batch under jit), matching pairs on the
  diagonal. logit_scale is the log temperature; exp(min(logit_scale, log 100)) multiplies cosine
  similarity. With `chunk_size`, each direction's log-sum-exp is computed that many rows at a
  time."""
  image, text = _unit(image_embedding), _unit(text_embedding)
  scale = _scale(logit_scale)
  matched = scale * jnp.sum(image * text, axis=-1)
  lse = lambda keys: lambda queries: jax.nn.logsumexp(scale * queries @ keys.T, axis=1)
  image_to_text = _map_chunks(lse(text), chunk_size, image) - matched
  text_to_image = _map_chunks(lse(image), chunk_size, text) - matched
  return 0.5 * (image_to_text.mean() + text_to_image.mean())


def sigmoid_contrastive_loss(image_embedding, text_embedding, logit_scale, logit_bias,
                             chunk_size: int = 0):
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every image-text pair of the batch is a
  binary classification, positive on the diagonal, with logits exp(t') cos + b; summed over pairs
  and divided by the batch size. `chunk_size` as for the softmax loss."""
  image, text = _unit(image_embedding), _unit(text_embedding)
  scale = _scale(logit_scale)
  rows = image.shape[0]

  def chunk_loss(queries, positions):
    logits = scale * queries @ text.T + logit_bias
    signs = 2.0 * (positions[:, None] == jnp.arange(rows)[None, :]) - 1.0
    return jnp.sum(jax.nn.softplus(-signs * logits), axis=1)

  return jnp.sum(_map_chunks(chunk_loss, chunk_size, image, jnp.arange(rows))) / rows


def contrastive(outputs: Mapping, loss_config: Mapping | None = None):
  """The contrastive loss `config.loss.contrastive` names, on the model's outputs."""
  loss_config = loss_config or {}
  kind = loss_config.get("contrastive", "softmax")
  chunk = int(loss_config.get("contrastive_chunk", 0) or 0)
  if kind == "softmax":
    return contrastive_loss(outputs["image_embedding"], outputs["text_embedding"],
                            outputs["logit_scale"], chunk)
  if kind == "sigmoid":
    if "logit_bias" not in outputs:
      raise cli.UserError("config.loss.contrastive='sigmoid' needs the learned bias: set "
                          f"config.model.logit_bias_init (SigLIP: {SIGLIP_LOGIT_BIAS_INIT})")
    return sigmoid_contrastive_loss(outputs["image_embedding"], outputs["text_embedding"],
                                    outputs["logit_scale"], outputs["logit_bias"], chunk)
  raise cli.UserError(f"config.loss.contrastive: expected one of {list(CONTRASTIVE_KINDS)}, "
                      f"found {kind!r}")


def check_weights(tasks, weights: Mapping[str, float]) -> None:
  missing = sorted(set(tasks) - set(weights))
  if missing:
    raise cli.UserError(f"config.loss.weights: no weight for active tasks {missing}; "
                        f"found weights for {sorted(weights)}")


def task_terms(outputs: Mapping, batch: Mapping, tasks, loss_config: Mapping | None = None):
  """{task: (numerator, denominator)} of each active task's loss on this (part of the) batch."""
  return {task.name: task.loss_terms(outputs["heads"], batch, loss_config or {})
          for task in task_lib.get_all(task_lib.canonical_order(tasks), "model.heads.tasks")}


def combine(contrastive_value, terms: Mapping, weights: Mapping[str, float]):
  """(total, metrics) from the contrastive loss and each task's (numerator, denominator)."""
  per_task = {name: ratio(numerator, denominator) for name, (numerator, denominator) in terms.items()}
  total = contrastive_value + sum(weights[name] * value for name, value in per_task.items())
  metrics = {"loss": total, "loss/contrastive": contrastive_value}
  metrics.update({f"loss/{name}": value for name, value in per_task.items()})
  return total, metrics


def total_loss(outputs: Mapping, batch: Mapping, tasks, weights: Mapping[str, float],
               loss_config: Mapping | None = None):
  """contrastive + sum_t lambda_t * loss_t; returns (total, {name: value}) for logging.

  `outputs["heads"]` holds the heads' named outputs; `loss_config` is `config.loss` (the
  contrastive kind and chunk, task options such as `depth`).
  """
  check_weights(tasks, weights)
  with jax.named_scope("loss"):  # names its ops in profiles (benchmarks/step_profile.py)
    return combine(contrastive(outputs, loss_config),
                   task_terms(outputs, batch, tasks, loss_config), weights)
