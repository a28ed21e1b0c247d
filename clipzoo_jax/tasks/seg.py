"""Semantic segmentation: a PNG class map per image (255 / 65535 = ignore), a per-pixel class
logits head, pixel cross-entropy over the labelled pixels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clipzoo_jax import losses
from clipzoo_jax.tasks import base


def seg_loss(logits, labels, example_mask):
  """Pixel cross-entropy. logits (B,H,W,C), labels (B,H,W) int with -1 = ignore."""
  return losses.ratio(*seg_terms(logits, labels, example_mask))


def seg_terms(logits, labels, example_mask):
  valid = (labels >= 0) & (example_mask[:, None, None] > 0)
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  # -log_softmax at the label, without a (B, H, W, C) array of log-probabilities
  return losses.masked_terms(jax.nn.logsumexp(logits, axis=-1) - picked,
                             valid.astype(jnp.float32))


@base.register
class Segmentation(base.Task):
  name = "seg"
  label_fields = ("seg",)

  def label_fields_spec(self, label_size, max_boxes, model_config):
    return {"seg": base.Field((label_size, label_size), np.int32)}

  def synthetic_labels(self, rng, batch_size, label_size, max_boxes, model_config):
    classes = rng.integers(-1, model_config.heads.num_seg_classes,
                           (batch_size, label_size, label_size))
    return {"seg": classes.astype(np.int32), "seg_mask": np.ones((batch_size,), np.float32)}

  def check_dataset(self, manifest_entry, model_config, where):
    base.check_class_count(self.name, manifest_entry, "model.heads.num_seg_classes",
                           model_config.heads.num_seg_classes, where)

  def parse_features(self):
    import tensorflow as tf
    return {"seg/encoded": tf.io.FixedLenFeature([], tf.string, default_value="")}

  def decode(self, parsed, window, flip, options):
    import tensorflow as tf
    from clipzoo_jax.data import augment, records, tf_codecs
    png, present = tf_codecs.png_or_stand_in(parsed["seg/encoded"], tf_codecs.ABSENT_PNG_U8[1])
    # decode_png(dtype=uint16) scales 8-bit values by 257: 8-bit ignore 255 becomes 65535 too.
    steps = tf.io.decode_png(png, channels=1, dtype=tf.uint16)[..., 0]
    steps = tf.cast(augment.augment_dense(steps, window, flip, options.label_size), tf.int32)
    classes = tf.where(tf.equal(tf_codecs.png_bit_depth(png), 8), steps // 257, steps)
    classes = tf.where(steps == records.SEG_IGNORE_U16, -1, classes)
    return {"seg": tf.where(present, classes, -1), "seg_mask": tf.cast(present, tf.float32)}

  def decode_numpy(self, features, window, flip, options, image_hw):
    from clipzoo_jax.data import augment_np, records
    size = options.label_size
    if not features.get("seg/encoded"):
      return {"seg": np.full((size, size), -1, np.int32), "seg_mask": np.float32(0.0)}
    stored = augment_np.decode_png(features["seg/encoded"][0], "seg", 1)
    augment_np.check_label_shape("seg", stored.shape, image_hw)
    ignore = records.SEG_IGNORE_U8 if stored.dtype == np.uint8 else records.SEG_IGNORE_U16
    steps = augment_np.crop_resize_nearest(stored, window, size, flip).astype(np.int32)
    return {"seg": np.where(steps == ignore, -1, steps), "seg_mask": np.float32(1.0)}

  def heads(self, model_config):
    classes = int(model_config.heads.num_seg_classes)
    # class boundaries: its last conv runs at the label size (models/heads.py)
    return (base.HeadSpec("seg_head", classes, (base.OutputSlice("seg", 0, classes),),
                          final_upsample="conv"),)

  def loss_terms(self, outputs, batch, loss_config):
    return seg_terms(outputs["seg"], batch["seg"], batch["seg_mask"])

  def resize_labels(self, labels, size):
    from clipzoo_jax.data import records
    from clipzoo_jax.experts import resize
    return records.Labels(seg=resize.resize_class_map(labels.seg, size))

  def label_image(self, labels, classes):
    from clipzoo_jax import visualize
    return visualize.colorize_seg(labels.seg, len(classes))
