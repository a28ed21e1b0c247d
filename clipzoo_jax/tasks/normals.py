"""Surface normals: unit camera-frame vectors stored as an RGB PNG ((0,0,0) = invalid), a
three-channel head normalized to unit length, and an angular (1 - cosine) loss."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from clipzoo_jax import losses
from clipzoo_jax.tasks import base


def normals_loss(prediction, target, example_mask):
  """Angular loss 1 - cos(angle) between unit predicted and target normals, over valid pixels."""
  return losses.ratio(*normals_terms(prediction, target, example_mask))


def normals_terms(prediction, target, example_mask):
  target_norm = jnp.linalg.norm(target, axis=-1)
  valid = ((target_norm > 0.5) & (example_mask[:, None, None] > 0)).astype(jnp.float32)
  pred = prediction / jnp.maximum(jnp.linalg.norm(prediction, axis=-1, keepdims=True), 1e-6)
  cosine = jnp.sum(pred * target / jnp.maximum(target_norm, 1e-6)[..., None], axis=-1)
  return losses.masked_terms(1.0 - cosine, valid)


@base.register
class Normals(base.Task):
  name = "normals"
  label_fields = ("normals",)

  def label_fields_spec(self, label_size, max_boxes, model_config):
    return {"normals": base.Field((label_size, label_size, 3), np.float32)}

  def synthetic_labels(self, rng, batch_size, label_size, max_boxes, model_config):
    normals = rng.normal(size=(batch_size, label_size, label_size, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return {"normals": normals.astype(np.float32),
            "normals_mask": np.ones((batch_size,), np.float32)}

  def parse_features(self):
    import tensorflow as tf
    return {"normals/encoded": tf.io.FixedLenFeature([], tf.string, default_value="")}

  def decode(self, parsed, window, flip, options):
    import tensorflow as tf
    from clipzoo_jax.data import augment, tf_codecs
    png, present = tf_codecs.png_or_stand_in(parsed["normals/encoded"],
                                             tf_codecs.ABSENT_PNG_U8[3])
    pixels = augment.augment_dense(tf.io.decode_png(png, channels=3), window, flip,
                                   options.label_size)
    valid = tf.reduce_any(pixels != 0, axis=-1, keepdims=True)
    xyz = tf.cast(pixels, tf.float32) / 127.5 - 1.0
    normals = augment.mirror_normals(tf.where(valid, augment.unit_normals(xyz), 0.0), flip)
    return {"normals": tf.where(present, normals, 0.0),
            "normals_mask": tf.cast(present, tf.float32)}

  def decode_numpy(self, features, window, flip, options, image_hw):
    from clipzoo_jax.data import augment_np
    size = options.label_size
    if not features.get("normals/encoded"):
      return {"normals": np.zeros((size, size, 3), np.float32), "normals_mask": np.float32(0.0)}
    stored = augment_np.decode_png(features["normals/encoded"][0], "normals", 3)
    augment_np.check_label_shape("normals", stored.shape[:2], image_hw)
    pixels = augment_np.crop_resize_nearest(stored, window, size, flip)
    valid = (pixels != 0).any(axis=-1, keepdims=True)
    xyz = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    normals = augment_np.mirror_normals(np.where(valid, augment_np.unit_normals(xyz), 0.0), flip)
    return {"normals": normals.astype(np.float32), "normals_mask": np.float32(1.0)}

  def heads(self, model_config):
    return (base.HeadSpec("normals_head", 3,
                          (base.OutputSlice("normals", 0, 3, unit_norm=True),)),)

  def loss_terms(self, outputs, batch, loss_config):
    return normals_terms(outputs["normals"], batch["normals"], batch["normals_mask"])

  def resize_labels(self, labels, size):
    from clipzoo_jax.data import records
    from clipzoo_jax.experts import resize
    return records.Labels(normals=resize.resize_normals(labels.normals, size))

  def label_image(self, labels, classes):
    from clipzoo_jax import visualize
    return visualize.colorize_normals(labels.normals)
