"""Joint image + label augmentation in TF ops: one crop window and one flip for all of a record.

Windows are normalized (y0, x0, height, width) in [0, 1], snapped to whole image pixels, so
labels stored at a lower resolution than the image are cropped at exactly the same place.
Randomness is stateless: a function of the per-example seed only, so a restarted pipeline
augments the same example the same way.
"""

from __future__ import annotations

import math

import tensorflow as tf

from clipzoo_jax.data.augment_np import AugmentOptions  # noqa: F401  (re-exported)
from clipzoo_jax.data.normalization import CLIP_MEAN, CLIP_STD
_CROP_ATTEMPTS = 10


# ---------------------------------------------------------------------------------------------
# Sampling: windows and flips from a per-example seed.


def example_seed(base_seed: int, position) -> tf.Tensor:
  """The stateless seed (shape [2], int64) of the example at `position` in a process's stream."""
  return tf.stack([tf.constant(base_seed, tf.int64), tf.cast(position, tf.int64)])


def random_crop_window(seed, image_hw, scale, ratio) -> tf.Tensor:
  """Random-resized-crop window (y0, x0, h, w), normalized, as torchvision samples it.

  Tries 10 (area, aspect) draws at once and keeps the first that fits; if none fits, falls back
  to the largest central window with the aspect clamped into `ratio`.
  """
  area_seed, ratio_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  height, width = tf.unstack(tf.cast(image_hw, tf.float32))
  area = tf.random.stateless_uniform([_CROP_ATTEMPTS], area_seed, scale[0], scale[1])
  log_ratio = tf.random.stateless_uniform(
      [_CROP_ATTEMPTS], ratio_seed, math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  # A crop of area a*H*W and pixel aspect r has normalized sides sqrt(a*r*H/W), sqrt(a/r*W/H).
  crop_w = tf.sqrt(area * aspect * height / width)
  crop_h = tf.sqrt(area / aspect * width / height)
  fits = (crop_w <= 1.0) & (crop_h <= 1.0)
  first = tf.argmax(tf.cast(fits, tf.int32))
  image_aspect = width / height
  fallback_h = tf.minimum(1.0, image_aspect / ratio[0])
  fallback_w = tf.minimum(1.0, ratio[1] / image_aspect)
  found = tf.reduce_any(fits)
  h = tf.where(found, crop_h[first], fallback_h)
  w = tf.where(found, crop_w[first], fallback_w)
  offset = tf.random.stateless_uniform([2], offset_seed)
  offset = tf.where(found, offset, 0.5)
  return tf.stack([offset[0] * (1.0 - h), offset[1] * (1.0 - w), h, w])


def central_crop_window(image_hw) -> tf.Tensor:
  """The largest central square, the eval view (resize short side, crop centre)."""
  height, width = tf.unstack(tf.cast(image_hw, tf.float32))
  side = tf.minimum(height, width)
  h, w = side / height, side / width
  return tf.stack([(1.0 - h) / 2, (1.0 - w) / 2, h, w])


def _pixel_box(window, image_hw):
  """The window rounded to whole image pixels: int32 (y0, x0, h, w), at least 1 px, inside."""
  size = tf.cast(tf.concat([image_hw, image_hw], 0), tf.float32)
  y0, x0, h, w = tf.unstack(tf.cast(tf.round(window * size), tf.int32))
  height, width = tf.unstack(tf.cast(image_hw, tf.int32))
  h, w = tf.clip_by_value(h, 1, height), tf.clip_by_value(w, 1, width)
  return tf.stack([tf.clip_by_value(y0, 0, height - h), tf.clip_by_value(x0, 0, width - w), h, w])


def snap_window(window, image_hw):
  """The window moved to whole image pixels, so the image crop is an exact slice (as in
  torchvision's RandomResizedCrop); labels at any resolution use the same normalized window."""
  size = tf.cast(tf.concat([image_hw, image_hw], 0), tf.float32)
  return tf.cast(_pixel_box(window, image_hw), tf.float32) / size


def sample_window_and_flip(seed, image_hw, options: AugmentOptions, train: bool):
  """(window, flip) of one example: random when training, central and unflipped for eval."""
  if not train:
    return snap_window(central_crop_window(image_hw), image_hw), tf.constant(False)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  window = random_crop_window(crop_seed, image_hw, options.crop_scale, options.crop_ratio)
  flip = tf.random.stateless_uniform([], flip_seed) < options.flip_probability
  return snap_window(window, image_hw), flip


# ---------------------------------------------------------------------------------------------
# Resampling a window to a square output. Pixel i of an input of size n covers [i/n, (i+1)/n];
# output pixel j samples the window at its centre (the half-pixel convention of tf.image.resize).


def _source_coordinates(start, extent, out_size: int, in_size):
  """Continuous input pixel coordinates (pixel i has centre i + 0.5) of the output centres."""
  centres = (tf.range(out_size, dtype=tf.float32) + 0.5) / out_size
  return (start + centres * extent) * tf.cast(in_size, tf.float32)


def _nearest_indices(start, extent, out_size: int, in_size):
  coords = _source_coordinates(start, extent, out_size, in_size)
  return tf.clip_by_value(tf.cast(tf.floor(coords), tf.int32), 0, in_size - 1)


def _mirrored(indices, flip):
  return tf.where(flip, tf.reverse(indices, axis=[0]), indices)


def crop_resize_nearest(label, window, size: int, flip=False):
  """Nearest-neighbour crop+resize (+ mirror) of a (H, W, ...) label: never blends two values."""
  shape = tf.shape(label)
  rows = _nearest_indices(window[0], window[2], size, shape[0])
  cols = _mirrored(_nearest_indices(window[1], window[3], size, shape[1]), flip)
  return tf.gather(tf.gather(label, rows, axis=0), cols, axis=1)


def crop_resize_bilinear(image, window, size: int, antialias: bool = False):
  """Bilinear crop+resize of a (H, W, C) image to float32 (size, size, C).

  The window is rounded to whole pixels (see snap_window) and sliced; the resize clamps at the
  slice's edges. A slice + tf.image.resize costs a quarter of a sub-pixel ScaleAndTranslate.
  """
  y0, x0, h, w = tf.unstack(_pixel_box(window, tf.shape(image)[:2]))
  crop = image[y0:y0 + h, x0:x0 + w]
  return tf.image.resize(crop, [size, size], "bilinear", antialias=antialias)


def mirror(array, flip):
  """Left-right mirror of a (H, W, ...) array when `flip` (a scalar bool tensor)."""
  return tf.cond(flip, lambda: tf.reverse(array, axis=[1]), lambda: array)


# ---------------------------------------------------------------------------------------------
# Per-kind transforms.


def clip_normalize(pixels):
  """(..., 3) pixel values in [0, 255] to CLIP-normalized float32.

  Written as a 1x1 convolution: TF's per-channel broadcasting ops cost 3x more per pixel.
  """
  inverse_std = 1.0 / (255.0 * tf.constant(CLIP_STD, tf.float32))
  kernel = tf.reshape(tf.linalg.diag(inverse_std), [1, 1, 3, 3])
  offset = -tf.constant(CLIP_MEAN, tf.float32) / tf.constant(CLIP_STD, tf.float32)
  batched = tf.reshape(tf.cast(pixels, tf.float32), [1, -1, 1, 3])
  normalized = tf.nn.bias_add(tf.nn.conv2d(batched, kernel, 1, "VALID"), offset)
  return tf.reshape(normalized, tf.shape(pixels))


def augment_image(image, window, flip, size: int, antialias: bool = False):
  """uint8 (H, W, 3) image to float32 (size, size, 3), cropped, flipped, CLIP-normalized."""
  resized = crop_resize_bilinear(image, window, size, antialias)
  return mirror(clip_normalize(resized), flip)


def augment_image_uint8(image, window, flip, size: int, antialias: bool = False):
  """uint8 (H, W, 3) image to uint8 (size, size, 3), cropped and flipped; the model normalizes
  uint8 pixels on the device (`models.clip.normalize_pixels`)."""
  resized = crop_resize_bilinear(image, window, size, antialias)
  return mirror(tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8), flip)


def augment_dense(label, window, flip, size: int):
  """Any dense label as stored (class ids, depth steps, normal pixels): nearest crop + flip.

  Nearest sampling commutes with per-pixel decoding, so callers resample the small stored
  integers first and decode afterwards; an invalid 0 is never blended into a valid value.
  """
  return crop_resize_nearest(label, window, size, flip)


def unit_normals(normals):
  """Re-normalizes (..., 3) normals to unit length; all-zero (invalid) vectors stay zero."""
  norm = tf.norm(normals, axis=-1, keepdims=True)
  return tf.where(norm > 1e-6, normals / tf.maximum(norm, 1e-6), 0.0)


def mirror_normals(normals, flip):
  """A left-right flip negates the camera-frame x component (x points right)."""
  sign = tf.where(flip, tf.constant([-1.0, 1.0, 1.0]), tf.constant([1.0, 1.0, 1.0]))
  return normals * sign


def box_area(boxes):
  return (tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
          * tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0))


def crop_boxes(boxes, window, min_area_fraction: float):
  """Boxes (N, 4) ymin,xmin,ymax,xmax into the window's frame, clipped to [0, 1], and a keep mask.

  A box is kept when the part inside the window is at least `min_area_fraction` of its visible
  area in the original image and has a positive height and width.
  """
  y0, x0, h, w = tf.unstack(window)
  visible = tf.clip_by_value(boxes, 0.0, 1.0)
  lower = tf.stack([y0, x0, y0, x0])
  upper = tf.stack([y0 + h, x0 + w, y0 + h, x0 + w])
  inside = tf.minimum(tf.maximum(visible, lower), upper)
  area, inside_area = box_area(visible), box_area(inside)
  keep = ((inside[:, 2] > inside[:, 0]) & (inside[:, 3] > inside[:, 1])
          & (inside_area >= min_area_fraction * area) & (area > 0))
  cropped = (inside - lower) / tf.stack([h, w, h, w])
  return tf.clip_by_value(cropped, 0.0, 1.0), keep


def mirror_boxes(boxes, flip):
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
  mirrored = tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)
  return tf.where(flip, mirrored, boxes)


def pad_boxes(boxes, classes, scores, keep, max_boxes: int):
  """Kept boxes, highest score first (ties keep record order), padded to `max_boxes`.

  Returns float32 (max_boxes, 4) and int32 (max_boxes,) with class -1 marking padding.
  """
  boxes = tf.boolean_mask(boxes, keep)
  classes = tf.boolean_mask(tf.cast(classes, tf.int32), keep)
  order = tf.argsort(-tf.boolean_mask(scores, keep), stable=True)[:max_boxes]
  boxes, classes = tf.gather(boxes, order), tf.gather(classes, order)
  missing = max_boxes - tf.shape(classes)[0]
  boxes = tf.pad(boxes, [[0, missing], [0, 0]])
  classes = tf.pad(classes, [[0, missing]], constant_values=-1)
  return tf.ensure_shape(boxes, [max_boxes, 4]), tf.ensure_shape(classes, [max_boxes])


def augment_boxes(boxes, classes, scores, window, flip, options: AugmentOptions):
  """Boxes of one record through the crop and the flip, as fixed-size padded arrays."""
  cropped, keep = crop_boxes(boxes, window, options.min_box_area_fraction)
  return pad_boxes(mirror_boxes(cropped, flip), classes, scores, keep, options.max_boxes)
