"""Training losses: CLIP's symmetric InfoNCE, and the total with the dense task losses.

Pure functions of arrays. Each task's loss lives with its task (`clipzoo_jax/tasks/`); each
averages over the valid pixels (or boxes) of the whole batch and is 0 when nothing in the batch is
valid, so an absent label never acts as a zero label. `<task>_mask` (B,) marks which examples
carry that task's label at all.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from clipzoo_jax import cli
from clipzoo_jax import tasks as task_lib

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature to at most 100


def masked_mean(values, weights):
  total = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.maximum(total, 1.0)


def contrastive_loss(image_embedding, text_embedding, logit_scale):
  """Symmetric InfoNCE over the batch (the global batch under jit), matching pairs on the diagonal.

  logit_scale is the log temperature; exp(min(logit_scale, log 100)) multiplies cosine similarity.
  """
  image = image_embedding / jnp.linalg.norm(image_embedding, axis=-1, keepdims=True)
  text = text_embedding / jnp.linalg.norm(text_embedding, axis=-1, keepdims=True)
  scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
  logits = scale * image @ text.T
  labels = jnp.arange(logits.shape[0])
  image_to_text = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1)
  text_to_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], 0)
  return 0.5 * (image_to_text.mean() + text_to_image.mean())


def total_loss(outputs: Mapping, batch: Mapping, tasks, weights: Mapping[str, float],
               loss_config: Mapping | None = None):
  """contrastive + sum_t lambda_t * loss_t; returns (total, {name: value}) for logging.

  `outputs["heads"]` holds the heads' named outputs; `loss_config` is `config.loss` (task
  options such as `depth`).
  """
  contrastive = contrastive_loss(outputs["image_embedding"], outputs["text_embedding"],
                                 outputs["logit_scale"])
  missing = sorted(set(tasks) - set(weights))
  if missing:
    raise cli.UserError(f"config.loss.weights: no weight for active tasks {missing}; "
                     f"found weights for {sorted(weights)}")
  loss_config = loss_config or {}
  per_task = {task.name: task.loss(outputs["heads"], batch, loss_config)
              for task in task_lib.get_all(task_lib.canonical_order(tasks), "model.heads.tasks")}
  total = contrastive + sum(weights[t] * loss for t, loss in per_task.items())
  metrics = {"loss": total, "loss/contrastive": contrastive}
  metrics.update({f"loss/{t}": loss for t, loss in per_task.items()})
  return total, metrics
