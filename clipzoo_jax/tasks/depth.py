"""Monocular depth: a 16-bit PNG of depth (or inverse depth) steps with a per-record scale
(0 = invalid), a one-channel head, and a scale-and-shift-invariant (relative experts) or SILog
(metric experts) loss chosen by `config.loss.depth`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from clipzoo_jax import cli
from clipzoo_jax import losses
from clipzoo_jax.tasks import base

LOSS_KINDS = ("ssi", "silog")


def _depth_valid(target, example_mask):
  return ((target > 0) & jnp.isfinite(target) & (example_mask[:, None, None] > 0)).astype(jnp.float32)


def depth_ssi_loss(prediction, target, example_mask):
  return losses.ratio(*depth_ssi_terms(prediction, target, example_mask))


def depth_ssi_terms(prediction, target, example_mask):
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
  return losses.masked_terms(per_image, has_label)


def depth_silog_loss(prediction, target, example_mask, variance_focus: float = 0.85):
  return losses.ratio(*depth_silog_terms(prediction, target, example_mask, variance_focus))


def depth_silog_terms(prediction, target, example_mask, variance_focus: float = 0.85):
  """Scale-invariant log loss (Eigen et al.) for metric experts; prediction is log-depth."""
  valid = _depth_valid(target, example_mask)
  count = jnp.maximum(valid.sum((1, 2)), 1.0)
  diff = (prediction - jnp.log(jnp.where(valid > 0, target, 1.0))) * valid
  mean_sq = (diff ** 2).sum((1, 2)) / count
  sq_mean = (diff.sum((1, 2)) / count) ** 2
  per_image = jnp.sqrt(jnp.maximum(mean_sq - variance_focus * sq_mean, 1e-12))
  return losses.masked_terms(per_image, (valid.sum((1, 2)) > 0).astype(jnp.float32))


@base.register
class Depth(base.Task):
  name = "depth"
  label_fields = ("depth",)

  def label_fields_spec(self, label_size, max_boxes, model_config):
    return {"depth": base.Field((label_size, label_size), np.float32)}

  def synthetic_labels(self, rng, batch_size, label_size, max_boxes, model_config):
    depth = rng.uniform(0.5, 5, (batch_size, label_size, label_size))
    return {"depth": depth.astype(np.float32), "depth_mask": np.ones((batch_size,), np.float32)}

  def parse_features(self):
    import tensorflow as tf
    return {"depth/encoded": tf.io.FixedLenFeature([], tf.string, default_value=""),
            "depth/scale": tf.io.FixedLenFeature([], tf.float32, default_value=0.0)}

  def decode(self, parsed, window, flip, options):
    import tensorflow as tf
    from clipzoo_jax.data import augment, tf_codecs
    png, present = tf_codecs.png_or_stand_in(parsed["depth/encoded"], tf_codecs.ABSENT_PNG_U16)
    steps = augment.augment_dense(tf.io.decode_png(png, dtype=tf.uint16)[..., 0], window, flip,
                                  options.label_size)
    depth = tf.cast(steps, tf.float32) * parsed["depth/scale"]
    return {"depth": tf.where(present, depth, 0.0), "depth_mask": tf.cast(present, tf.float32)}

  def decode_numpy(self, features, window, flip, options, image_hw):
    from clipzoo_jax.data import augment_np
    size = options.label_size
    if not features.get("depth/encoded"):
      return {"depth": np.zeros((size, size), np.float32), "depth_mask": np.float32(0.0)}
    stored = augment_np.decode_png(features["depth/encoded"][0], "depth", 1)
    if stored.dtype != np.uint16:
      raise ValueError(f"depth label is a {stored.dtype} PNG; expected 16-bit depth steps")
    scale = features.get("depth/scale") or []
    if len(scale) != 1 or not np.isfinite(scale[0]) or scale[0] <= 0:
      raise ValueError(f"depth/scale expected one positive number, found {list(scale)}")
    augment_np.check_label_shape("depth", stored.shape, image_hw)
    steps = augment_np.crop_resize_nearest(stored, window, size, flip)
    return {"depth": steps.astype(np.float32) * np.float32(scale[0]),
            "depth_mask": np.float32(1.0)}

  def heads(self, model_config):
    return (base.HeadSpec("depth_head", 1, (base.OutputSlice("depth", 0),)),)

  def validate_config(self, config):
    kind = config.loss.get("depth", "ssi")
    if kind not in LOSS_KINDS:
      raise cli.UserError(f"config.loss.depth: expected one of {list(LOSS_KINDS)}, found {kind!r}")

  def loss_terms(self, outputs, batch, loss_config):
    terms = {"ssi": depth_ssi_terms, "silog": depth_silog_terms}[loss_config.get("depth", "ssi")]
    return terms(outputs["depth"], batch["depth"], batch["depth_mask"])

  def resize_labels(self, labels, size):
    from clipzoo_jax.data import records
    from clipzoo_jax.experts import resize
    return records.Labels(depth=resize.resize_depth(labels.depth, size))

  def label_image(self, labels, classes):
    from clipzoo_jax import visualize
    return visualize.colorize_depth(labels.depth)
