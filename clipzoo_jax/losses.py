"""Training losses: CLIP's symmetric InfoNCE and the dense pseudo-label task losses.

Pure functions of arrays. Each task loss averages over the valid pixels (or boxes) of the whole
batch and is 0 when nothing in the batch is valid, so an absent label never acts as a zero label.
`<task>_mask` (B,) marks which examples carry that task's label at all.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature to at most 100


def _masked_mean(values, weights):
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


def seg_loss(logits, labels, example_mask):
  """Pixel cross-entropy. logits (B,H,W,C), labels (B,H,W) int with -1 = ignore."""
  valid = (labels >= 0) & (example_mask[:, None, None] > 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return _masked_mean(-picked, valid.astype(jnp.float32))


def _depth_valid(target, example_mask):
  return ((target > 0) & jnp.isfinite(target) & (example_mask[:, None, None] > 0)).astype(jnp.float32)


def depth_ssi_loss(prediction, target, example_mask):
  """Scale-and-shift-invariant depth loss (for relative-depth experts such as DPT / MiDaS).

  Per image, the prediction is aligned to the target by the least-squares scale s and shift t
  over valid pixels; the loss is the aligned squared error divided by the target's variance,
  i.e. the fraction of target variance the best affine map of the prediction leaves unexplained
  (0 perfect, 1 no better than a constant). Normalizing makes the loss independent of the expert's
  depth units, so one lambda works for metric and relative experts. Averaged over labelled images.
  prediction, target (B,H,W); target 0 = invalid.
  """
  valid = _depth_valid(target, example_mask)
  count = jnp.maximum(valid.sum((1, 2)), 1.0)
  mean = lambda x: (x * valid).sum((1, 2)) / count
  pred_mean, target_mean = mean(prediction), mean(target)
  pred_centered = (prediction - pred_mean[:, None, None]) * valid
  target_centered = (target - target_mean[:, None, None]) * valid
  pred_var = (pred_centered ** 2).sum((1, 2))
  covariance = (pred_centered * target_centered).sum((1, 2))
  scale = covariance / jnp.maximum(pred_var, 1e-12)
  residual = (scale[:, None, None] * pred_centered - target_centered) * valid
  target_var = (target_centered ** 2).sum((1, 2))
  per_image = (residual ** 2).sum((1, 2)) / jnp.maximum(target_var, 1e-12)
  has_label = (valid.sum((1, 2)) >= 2).astype(jnp.float32)
  return _masked_mean(per_image, has_label)


def depth_silog_loss(prediction, target, example_mask, variance_focus: float = 0.85):
  """Scale-invariant log loss (Eigen et al.) for metric experts; prediction is log-depth."""
  valid = _depth_valid(target, example_mask)
  count = jnp.maximum(valid.sum((1, 2)), 1.0)
  diff = (prediction - jnp.log(jnp.where(valid > 0, target, 1.0))) * valid
  mean_sq = (diff ** 2).sum((1, 2)) / count
  sq_mean = (diff.sum((1, 2)) / count) ** 2
  per_image = jnp.sqrt(jnp.maximum(mean_sq - variance_focus * sq_mean, 1e-12))
  return _masked_mean(per_image, (valid.sum((1, 2)) > 0).astype(jnp.float32))


def normals_loss(prediction, target, example_mask):
  """Angular loss 1 - cos(angle) between unit predicted and target normals, over valid pixels."""
  target_norm = jnp.linalg.norm(target, axis=-1)
  valid = ((target_norm > 0.5) & (example_mask[:, None, None] > 0)).astype(jnp.float32)
  pred = prediction / jnp.maximum(jnp.linalg.norm(prediction, axis=-1, keepdims=True), 1e-6)
  cosine = jnp.sum(pred * target / jnp.maximum(target_norm, 1e-6)[..., None], axis=-1)
  return _masked_mean(1.0 - cosine, valid)


# ---------------------------------------------------------------------------------------------
# Detection: CenterNet-style dense, static-shape targets built from padded boxes.


def gaussian_radius(height, width, min_overlap: float = 0.7):
  """CenterNet's radius: the largest centre shift keeping IoU >= min_overlap (in pixels)."""
  a1, b1 = 1.0, height + width
  c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
  r1 = (b1 + jnp.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
  a2, b2 = 4.0, 2 * (height + width)
  c2 = (1 - min_overlap) * width * height
  r2 = (b2 + jnp.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
  a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
  c3 = (min_overlap - 1) * width * height
  r3 = (b3 + jnp.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
  return jnp.minimum(jnp.minimum(r1, r2), r3)


def det_targets(boxes, classes, num_classes: int, size: tuple[int, int]):
  """Heatmap (B,H,W,C), box centre cells (B,K,2) int, sizes (B,K,2), offsets (B,K,2), valid (B,K).

  boxes (B,K,4) normalized ymin,xmin,ymax,xmax; classes (B,K) int, -1 = padding.
  """
  height, width = size
  ymin, xmin, ymax, xmax = [boxes[..., i] for i in range(4)]
  box_h, box_w = (ymax - ymin) * height, (xmax - xmin) * width
  valid = (classes >= 0) & (box_h > 0) & (box_w > 0)
  center = jnp.stack([(ymin + ymax) / 2 * height, (xmin + xmax) / 2 * width], -1)
  cell = jnp.clip(jnp.floor(center).astype(jnp.int32), 0, jnp.array([height - 1, width - 1]))
  sigma = jnp.maximum(gaussian_radius(box_h, box_w), 0.0) * 2 / 6 + 1.0 / 3
  ys = jnp.arange(height)[None, None, :, None]
  xs = jnp.arange(width)[None, None, None, :]
  dist2 = (ys - cell[..., 0, None, None]) ** 2 + (xs - cell[..., 1, None, None]) ** 2
  gaussian = jnp.exp(-dist2 / (2 * sigma[..., None, None] ** 2)) * valid[..., None, None]
  one_hot = jax.nn.one_hot(jnp.where(valid, classes, 0), num_classes) * valid[..., None]
  heatmap = jnp.max(gaussian[..., None] * one_hot[:, :, None, None, :], axis=1)
  sizes = jnp.stack([box_h / height, box_w / width], -1)
  offsets = center - cell
  return heatmap, cell, sizes, offsets, valid


def focal_heatmap_loss(logits, target, alpha: float = 2.0, beta: float = 4.0):
  """CenterNet's penalty-reduced pixel focal loss, summed (normalized by the caller)."""
  prob = jnp.clip(jax.nn.sigmoid(logits), 1e-4, 1 - 1e-4)
  positive = (target >= 1.0 - 1e-6).astype(jnp.float32)
  pos_term = -jnp.log(prob) * (1 - prob) ** alpha * positive
  neg_term = -jnp.log(1 - prob) * prob ** alpha * (1 - target) ** beta * (1 - positive)
  return jnp.sum(pos_term + neg_term)


def det_loss(heatmap_logits, size_pred, offset_pred, boxes, classes, example_mask,
             size_weight: float = 5.0, offset_weight: float = 1.0):
  """CenterNet loss: focal heatmap + L1 size + L1 centre offset at each object's centre cell,
  normalized by the number of objects in the batch. Examples without det labels are masked out."""
  batch, height, width, num_classes = heatmap_logits.shape
  classes = jnp.where(example_mask[:, None] > 0, classes, -1)
  heatmap, cell, sizes, offsets, valid = det_targets(boxes, classes, num_classes, (height, width))
  labelled = example_mask[:, None, None, None] > 0
  focal = focal_heatmap_loss(jnp.where(labelled, heatmap_logits, -1e4), heatmap)
  num_objects = jnp.maximum(valid.sum(), 1.0)
  gather = lambda dense: dense[jnp.arange(batch)[:, None], cell[..., 0], cell[..., 1]]
  weights = valid.astype(jnp.float32)[..., None]
  size_l1 = jnp.sum(jnp.abs(gather(size_pred) - sizes) * weights)
  offset_l1 = jnp.sum(jnp.abs(gather(offset_pred) - offsets) * weights)
  return (focal + size_weight * size_l1 + offset_weight * offset_l1) / num_objects


def task_losses(outputs: Mapping, batch: Mapping, tasks, depth_loss: str = "ssi") -> dict:
  """{task: loss} for the active tasks, from the heads' outputs and the batch's labels."""
  heads = outputs["heads"]
  losses = {}
  if "seg" in tasks:
    losses["seg"] = seg_loss(heads["seg"], batch["seg"], batch["seg_mask"])
  if "depth" in tasks:
    depth_fn = {"ssi": depth_ssi_loss, "silog": depth_silog_loss}.get(depth_loss)
    if depth_fn is None:
      raise ValueError(f"config.loss.depth: expected 'ssi' or 'silog', found {depth_loss!r}")
    losses["depth"] = depth_fn(heads["depth"], batch["depth"], batch["depth_mask"])
  if "normals" in tasks:
    losses["normals"] = normals_loss(heads["normals"], batch["normals"], batch["normals_mask"])
  if "det" in tasks:
    losses["det"] = det_loss(heads["det_heatmap"], heads["det_size"], heads["det_offset"],
                             batch["det_boxes"], batch["det_classes"], batch["det_mask"])
  return losses


def total_loss(outputs: Mapping, batch: Mapping, tasks, weights: Mapping[str, float],
               depth_loss: str = "ssi"):
  """contrastive + sum_t lambda_t * loss_t; returns (total, {name: value}) for logging."""
  contrastive = contrastive_loss(outputs["image_embedding"], outputs["text_embedding"],
                                 outputs["logit_scale"])
  per_task = task_losses(outputs, batch, tasks, depth_loss) if tasks else {}
  missing = sorted(set(tasks) - set(weights))
  if missing:
    raise ValueError(f"config.loss.weights: no weight for active tasks {missing}; "
                     f"found weights for {sorted(weights)}")
  total = contrastive + sum(weights[t] * loss for t, loss in per_task.items())
  metrics = {"loss": total, "loss/contrastive": contrastive}
  metrics.update({f"loss/{t}": loss for t, loss in per_task.items()})
  return total, metrics
