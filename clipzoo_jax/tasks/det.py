"""Detection: boxes, classes and scores per image (normalized ymin, xmin, ymax, xmax), padded to
`max_boxes` in the batch; CenterNet-style dense, static-shape targets (a class heatmap plus box
size and centre offset at each object's centre cell), which compile well on TPU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from clipzoo_jax.tasks import base

DET_HEATMAP_PRIOR = 0.1  # initial foreground probability of the heatmap, as CenterNet


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
  # Each box's Gaussian max-scattered into its class channel: (B, H, W, C) written once, where a
  # one-hot product would build a (B, K, H, W, C) array first (K x the heatmap; most of the det
  # loss's CPU time at 56 px and 80 classes). Padding boxes scatter zeros.
  batch = boxes.shape[0]
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], classes.shape)
  heatmap = jnp.zeros((batch, height, width, num_classes), gaussian.dtype)
  heatmap = heatmap.at[rows, :, :, jnp.where(valid, classes, 0)].max(gaussian)
  sizes = jnp.stack([box_h / height, box_w / width], -1)
  offsets = center - cell
  return heatmap, cell, sizes, offsets, valid


def focal_heatmap_loss(logits, target, alpha: float = 2.0, beta: float = 4.0):
  """CenterNet's penalty-reduced pixel focal loss, summed (normalized by the caller)."""
  prob = jnp.clip(jax.nn.sigmoid(logits), 1e-4, 1 - 1e-4)
  positive = target >= 1.0 - 1e-6
  # -log(p) (1-p)^alpha at the peaks, -log(1-p) p^alpha (1-target)^beta elsewhere, with one log
  # per pixel: the probability of the pixel's own label is picked first
  picked = jnp.where(positive, prob, 1 - prob)
  weight = jnp.where(positive, 1.0, _power(1 - target, beta)) * _power(1 - picked, alpha)
  return -jnp.sum(jnp.log(picked) * weight)


def _power(x, exponent: float):
  """x ** exponent as repeated products when the exponent is a whole number (CenterNet's 2 and
  4): a float exponent makes XLA compute exp(exponent * log(x)), two transcendental passes."""
  return x ** int(exponent) if float(exponent).is_integer() else x ** exponent


def det_loss(heatmap_logits, size_pred, offset_pred, boxes, classes, example_mask,
             size_weight: float = 5.0, offset_weight: float = 1.0):
  """CenterNet loss: focal heatmap + L1 size + L1 centre offset at each object's centre cell,
  normalized by the number of objects in the batch. Examples without det labels are masked out."""
  numerator, num_objects = det_terms(heatmap_logits, size_pred, offset_pred, boxes, classes,
                                     example_mask, size_weight, offset_weight)
  return numerator / jnp.maximum(num_objects, 1.0)


def det_terms(heatmap_logits, size_pred, offset_pred, boxes, classes, example_mask,
              size_weight: float = 5.0, offset_weight: float = 1.0):
  """(the summed CenterNet loss, the number of objects) of `det_loss`."""
  batch, height, width, num_classes = heatmap_logits.shape
  classes = jnp.where(example_mask[:, None] > 0, classes, -1)
  heatmap, cell, sizes, offsets, valid = det_targets(boxes, classes, num_classes, (height, width))
  labelled = example_mask[:, None, None, None] > 0
  focal = focal_heatmap_loss(jnp.where(labelled, heatmap_logits, -1e4), heatmap)
  gather = lambda dense: dense[jnp.arange(batch)[:, None], cell[..., 0], cell[..., 1]]
  weights = valid.astype(jnp.float32)[..., None]
  size_l1 = jnp.sum(jnp.abs(gather(size_pred) - sizes) * weights)
  offset_l1 = jnp.sum(jnp.abs(gather(offset_pred) - offsets) * weights)
  return focal + size_weight * size_l1 + offset_weight * offset_l1, valid.sum().astype(jnp.float32)


@base.register
class Detection(base.Task):
  name = "det"
  label_fields = ("det_boxes", "det_classes", "det_scores")
  has_panel = False  # boxes are drawn over the image

  def label_fields_spec(self, label_size, max_boxes, model_config):
    return {"det_boxes": base.Field((max_boxes, 4), np.float32),
            "det_classes": base.Field((max_boxes,), np.int32)}

  def synthetic_labels(self, rng, batch_size, label_size, max_boxes, model_config):
    corner = rng.uniform(0, 0.5, (batch_size, max_boxes, 2))
    classes = rng.integers(0, model_config.heads.num_det_classes, (batch_size, max_boxes))
    return {"det_boxes": np.concatenate([corner, corner + 0.3], -1).astype(np.float32),
            "det_classes": classes.astype(np.int32),
            "det_mask": np.ones((batch_size,), np.float32)}

  def check_dataset(self, manifest_entry, model_config, where):
    base.check_class_count(self.name, manifest_entry, "model.heads.num_det_classes",
                           model_config.heads.num_det_classes, where)

  def parse_features(self):
    import tensorflow as tf
    return {"det/boxes": tf.io.VarLenFeature(tf.float32),
            "det/classes": tf.io.VarLenFeature(tf.int64),
            "det/scores": tf.io.VarLenFeature(tf.float32),
            "det/count": tf.io.FixedLenFeature([], tf.int64, default_value=-1)}

  def decode(self, parsed, window, flip, options):
    import tensorflow as tf
    from clipzoo_jax.data import augment
    classes = tf.sparse.to_dense(parsed["det/classes"])
    boxes = tf.reshape(tf.sparse.to_dense(parsed["det/boxes"]), [-1, 4])
    scores = tf.sparse.to_dense(parsed["det/scores"])
    out = {}
    out["det_boxes"], out["det_classes"] = augment.augment_boxes(
        boxes, classes, scores, window, flip, options)
    # det/count marks a label with zero boxes; older records only show presence by their boxes.
    present = (parsed["det/count"] >= 0) | (tf.size(classes) > 0)
    out["det_mask"] = tf.cast(present, tf.float32)
    return out

  def decode_numpy(self, features, window, flip, options, image_hw):
    from clipzoo_jax.data import augment_np
    classes = np.asarray(features.get("det/classes", []), np.int64)
    boxes = np.asarray(features.get("det/boxes", []), np.float32)
    scores = np.asarray(features.get("det/scores", []), np.float32)
    if boxes.size != 4 * classes.size or scores.size != classes.size:
      raise ValueError(f"det/boxes has {boxes.size} numbers, det/classes {classes.size}, "
                       f"det/scores {scores.size}; expected 4 numbers, one class and one score "
                       "per box")
    out = {}
    out["det_boxes"], out["det_classes"] = augment_np.augment_boxes(
        boxes, classes, scores, window, flip, options)
    # det/count marks a label with zero boxes; older records only show presence by their boxes.
    present = features.get("det/count", [-1])[0] >= 0 or classes.size > 0
    out["det_mask"] = np.float32(present)
    return out

  def heads(self, model_config):
    classes = int(model_config.heads.num_det_classes)
    prior = -math.log((1 - DET_HEATMAP_PRIOR) / DET_HEATMAP_PRIOR)
    # the heatmap's one-pixel peaks: its last conv runs at the label size (models/heads.py)
    return (base.HeadSpec("det_heatmap_head", classes,
                          (base.OutputSlice("det_heatmap", 0, classes),), bias_init=prior,
                          final_upsample="conv"),
            base.HeadSpec("det_box_head", 4, (base.OutputSlice("det_size", 0, 2),
                                              base.OutputSlice("det_offset", 2, 4))))

  def loss_terms(self, outputs, batch, loss_config):
    return det_terms(outputs["det_heatmap"], outputs["det_size"], outputs["det_offset"],
                     batch["det_boxes"], batch["det_classes"], batch["det_mask"])

  def resize_labels(self, labels, size):
    from clipzoo_jax.data import records
    del size  # boxes are normalized
    return records.Labels(det_boxes=labels.det_boxes, det_classes=labels.det_classes,
                          det_scores=labels.det_scores)

  def draw_on_image(self, canvas, labels, image_shape, panel, classes):
    from clipzoo_jax import visualize
    visualize.draw_boxes(canvas, labels, image_shape, panel, classes)
