"""Joint augmentation ops against NumPy / PIL / tf.image references."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clipzoo_jax.data import augment


def _window(y0, x0, h, w):
  return tf.constant([y0, x0, h, w], tf.float32)


# ---------------------------------------------------------------------------------------------
# NumPy references, written from the half-pixel convention: input pixel i covers [i/n, (i+1)/n].


def _centres(start, extent, out_size, in_size):
  j = np.arange(out_size, dtype=np.float64) + 0.5
  return (start + j / out_size * extent) * in_size


def nearest_reference(label, window, size):
  y0, x0, h, w = window
  rows = np.clip(np.floor(_centres(y0, h, size, label.shape[0])).astype(int), 0, label.shape[0] - 1)
  cols = np.clip(np.floor(_centres(x0, w, size, label.shape[1])).astype(int), 0, label.shape[1] - 1)
  return label[rows][:, cols]


def bilinear_reference(image, window, size):
  y0, x0, h, w = window
  image = image.astype(np.float64)
  out = np.zeros((size, size, image.shape[2]))
  ys = _centres(y0, h, size, image.shape[0]) - 0.5
  xs = _centres(x0, w, size, image.shape[1]) - 0.5
  clip = lambda i, n: min(max(i, 0), n - 1)
  for a, y in enumerate(ys):
    for b, x in enumerate(xs):
      iy, ix = int(np.floor(y)), int(np.floor(x))
      fy, fx = y - iy, x - ix
      value = 0.0
      for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
          value = value + wy * wx * image[clip(iy + dy, image.shape[0]), clip(ix + dx, image.shape[1])]
      out[a, b] = value
  return out


def crop_boxes_reference(boxes, window, min_fraction):
  y0, x0, h, w = window
  kept = []
  for box in boxes:
    vis = np.clip(box, 0, 1)
    area = max(vis[2] - vis[0], 0) * max(vis[3] - vis[1], 0)
    top, left = max(vis[0], y0), max(vis[1], x0)
    bottom, right = min(vis[2], y0 + h), min(vis[3], x0 + w)
    if bottom <= top or right <= left or area <= 0:
      kept.append(None)
      continue
    if (bottom - top) * (right - left) < min_fraction * area:
      kept.append(None)
      continue
    kept.append(np.array([(top - y0) / h, (left - x0) / w, (bottom - y0) / h, (right - x0) / w]))
  return kept


# ---------------------------------------------------------------------------------------------
# Resampling.


@pytest.mark.parametrize("in_hw,size", [((20, 30), 12), ((7, 5), 16), ((16, 16), 16)])
def test_bilinear_full_window_matches_numpy_reference(in_hw, size):
  image = np.random.default_rng(0).integers(0, 256, in_hw + (3,)).astype(np.uint8)
  ours = augment.crop_resize_bilinear(image, _window(0, 0, 1, 1), size).numpy()
  np.testing.assert_allclose(ours, bilinear_reference(image, (0, 0, 1, 1), size), atol=1e-3)


def test_bilinear_crop_is_the_snapped_pixel_slice():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (23, 31, 3)).astype(np.uint8)
  for window in [(0.1, 0.2, 0.5, 0.7), (0.0, 0.37, 1.0, 0.63), (0.31, 0.05, 0.2, 0.3)]:
    snapped = augment.snap_window(_window(*window), (23, 31)).numpy()
    top, left = round(snapped[0] * 23), round(snapped[1] * 31)
    height, width = round(snapped[2] * 23), round(snapped[3] * 31)
    np.testing.assert_allclose(snapped * [23, 31, 23, 31], [top, left, height, width], atol=1e-4)
    assert abs(top - window[0] * 23) <= 0.5 and abs(height - window[2] * 23) <= 0.5
    crop = image[top:top + height, left:left + width]
    ours = augment.crop_resize_bilinear(image, _window(*window), 9).numpy()
    np.testing.assert_allclose(ours, bilinear_reference(crop, (0, 0, 1, 1), 9), atol=1e-3)
    again = augment.crop_resize_bilinear(image, tf.constant(snapped), 9).numpy()
    np.testing.assert_array_equal(ours, again)


def test_snapped_window_stays_inside_and_keeps_at_least_a_pixel():
  window = augment.snap_window(_window(0.99, 0.7, 0.001, 0.6), (10, 10)).numpy()
  np.testing.assert_allclose(window, [0.9, 0.4, 0.1, 0.6], atol=1e-6)


@pytest.mark.parametrize("in_hw,size", [((20, 30), 10), ((8, 8), 32), ((13, 9), 7)])
def test_nearest_full_window_matches_pil(in_hw, size):
  label = np.random.default_rng(2).integers(0, 200, in_hw).astype(np.uint8)
  ours = augment.crop_resize_nearest(label, _window(0, 0, 1, 1), size).numpy()
  reference = np.asarray(Image.fromarray(label).resize((size, size), Image.NEAREST))
  np.testing.assert_array_equal(ours, reference)


def test_nearest_crop_window_matches_numpy_reference_with_channels():
  label = np.random.default_rng(3).integers(0, 255, (17, 29, 3)).astype(np.uint8)
  for window in [(0.13, 0.21, 0.55, 0.61), (0.5, 0.0, 0.5, 1.0)]:
    ours = augment.crop_resize_nearest(label, _window(*window), 11).numpy()
    np.testing.assert_array_equal(ours, nearest_reference(label, window, 11))


def test_low_resolution_label_crops_the_same_region_as_the_image():
  # A label at 1/4 resolution, window in normalized units: the label's 4x4 blocks land where
  # the image's do (upsampled image of the block pattern equals the resampled label).
  blocks = np.random.default_rng(4).integers(0, 9, (6, 6)).astype(np.uint8)
  image_like = np.kron(blocks, np.ones((4, 4), np.uint8))
  window = _window(0.25, 0.125, 0.5, 0.75)
  from_label = augment.crop_resize_nearest(blocks, window, 12).numpy()
  from_image = augment.crop_resize_nearest(image_like, window, 12).numpy()
  np.testing.assert_array_equal(from_label, from_image)


def test_augment_image_normalizes_with_clip_statistics():
  image = np.random.default_rng(7).integers(0, 256, (10, 10, 3)).astype(np.uint8)
  out = augment.augment_image(image, _window(0, 0, 1, 1), tf.constant(False), 10).numpy()
  expected = (image / 255 - np.array(augment.CLIP_MEAN)) / np.array(augment.CLIP_STD)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_augment_dense_flip_mirrors_columns():
  label = np.arange(16, dtype=np.int32).reshape(4, 4)
  out = augment.augment_dense(label, _window(0, 0, 1, 1), tf.constant(True), 4).numpy()
  np.testing.assert_array_equal(out, label[:, ::-1])


def test_mirror_normals_negates_x_and_unit_normals_renormalizes():
  normals = np.array([[[0.3, -0.4, 1.2], [0.0, 0.0, 0.0]]], np.float32)
  unit = augment.unit_normals(normals).numpy()
  np.testing.assert_allclose(unit[0, 0], normals[0, 0] / np.linalg.norm(normals[0, 0]), rtol=1e-6)
  np.testing.assert_array_equal(unit[0, 1], 0.0)
  flipped = augment.mirror_normals(unit, tf.constant(True)).numpy()
  np.testing.assert_allclose(flipped[..., 0], -unit[..., 0])
  np.testing.assert_allclose(flipped[..., 1:], unit[..., 1:])


# ---------------------------------------------------------------------------------------------
# Boxes.


def test_crop_boxes_matches_numpy_reference():
  boxes = np.array([
      [0.1, 0.1, 0.4, 0.5],     # fully inside the window
      [0.1, 0.05, 0.3, 0.3],    # partly inside (30% of its area), kept
      [0.05, 0.6, 0.25, 0.95],  # mostly outside: dropped by the area rule
      [-0.2, 0.2, 0.5, 0.6],    # outside the image at the top: visible part counts
      [0.9, 0.9, 0.95, 0.95],   # outside the window
      [0.3, 0.3, 0.3, 0.6],     # degenerate already
  ], np.float32)
  window = (0.2, 0.15, 0.6, 0.5)
  cropped, keep = augment.crop_boxes(tf.constant(boxes), _window(*window), 0.25)
  reference = crop_boxes_reference(boxes, window, 0.25)
  np.testing.assert_array_equal(keep.numpy(), [r is not None for r in reference])
  for got, want in zip(cropped.numpy(), reference):
    if want is not None:
      np.testing.assert_allclose(got, want, atol=1e-6)
  assert keep.numpy().tolist() == [True, True, False, True, False, False]


def test_crop_boxes_random_windows_match_reference():
  rng = np.random.default_rng(5)
  corners = rng.uniform(-0.1, 1.1, (40, 2, 2))
  boxes = np.concatenate([corners.min(1), corners.max(1)], 1)[:, [0, 1, 2, 3]].astype(np.float32)
  for seed in range(5):
    window = augment.random_crop_window(tf.constant([seed, 7], tf.int64), (48, 64),
                                        (0.3, 1.0), (0.75, 1.333)).numpy()
    cropped, keep = augment.crop_boxes(tf.constant(boxes), tf.constant(window), 0.25)
    reference = crop_boxes_reference(boxes, window.astype(np.float64), 0.25)
    np.testing.assert_array_equal(keep.numpy(), [r is not None for r in reference])
    for got, want in zip(cropped.numpy()[keep.numpy()], [r for r in reference if r is not None]):
      np.testing.assert_allclose(got, want, atol=1e-5)


def test_mirror_boxes():
  boxes = tf.constant([[0.1, 0.2, 0.5, 0.3]])
  np.testing.assert_allclose(augment.mirror_boxes(boxes, tf.constant(True)).numpy(),
                             [[0.1, 0.7, 0.5, 0.8]], atol=1e-7)
  np.testing.assert_allclose(augment.mirror_boxes(boxes, tf.constant(False)).numpy(), boxes)


def test_pad_boxes_orders_by_score_truncates_and_pads():
  boxes = tf.constant(np.arange(20, dtype=np.float32).reshape(5, 4) / 20)
  classes = tf.constant([0, 1, 2, 3, 4], tf.int64)
  scores = tf.constant([0.5, 0.9, 0.5, 0.1, 0.7])
  keep = tf.constant([True, True, True, True, False])
  out_boxes, out_classes = augment.pad_boxes(boxes, classes, scores, keep, 3)
  np.testing.assert_array_equal(out_classes.numpy(), [1, 0, 2])  # ties keep record order
  np.testing.assert_allclose(out_boxes.numpy(), boxes.numpy()[[1, 0, 2]])
  out_boxes, out_classes = augment.pad_boxes(boxes, classes, scores, keep, 6)
  np.testing.assert_array_equal(out_classes.numpy(), [1, 0, 2, 3, -1, -1])
  np.testing.assert_array_equal(out_boxes.numpy()[4:], 0.0)
  assert out_classes.dtype == tf.int32 and out_boxes.shape == (6, 4)


# ---------------------------------------------------------------------------------------------
# Windows.


def test_random_crop_window_respects_scale_and_ratio_and_is_stateless():
  image_hw = (60, 80)
  scale, ratio = (0.3, 0.9), (0.6, 1.5)
  areas, aspects = [], []
  for position in range(200):
    seed = augment.example_seed(11, position)
    y0, x0, h, w = augment.random_crop_window(seed, image_hw, scale, ratio).numpy()
    again = augment.random_crop_window(seed, image_hw, scale, ratio).numpy()
    np.testing.assert_array_equal([y0, x0, h, w], again)
    assert 0 <= y0 and y0 + h <= 1 + 1e-6 and 0 <= x0 and x0 + w <= 1 + 1e-6
    areas.append(h * w)
    aspects.append((w * 80) / (h * 60))
  assert scale[0] - 1e-5 <= min(areas) and max(areas) <= scale[1] + 1e-5
  assert ratio[0] - 1e-4 <= min(aspects) and max(aspects) <= ratio[1] + 1e-4
  assert np.std(areas) > 0.05  # really random across positions


def test_random_crop_window_falls_back_to_a_central_window():
  # An aspect ratio of 2 at full area never fits a square image: centred full-width crop.
  window = augment.random_crop_window(tf.constant([0, 0], tf.int64), (30, 30), (1.0, 1.0),
                                      (2.0, 2.0)).numpy()
  np.testing.assert_allclose(window, [0.25, 0.0, 0.5, 1.0], atol=1e-6)


def test_eval_window_is_the_central_square_without_flip():
  options = augment.AugmentOptions(image_size=8, label_size=4)
  window, flip = augment.sample_window_and_flip(tf.constant([1, 2], tf.int64), (40, 20),
                                                options, train=False)
  np.testing.assert_allclose(window.numpy(), [0.25, 0.0, 0.5, 1.0])
  assert not flip.numpy()


def test_flip_probability_extremes_and_rate():
  always = augment.AugmentOptions(image_size=8, label_size=4, flip_probability=1.0)
  never = augment.AugmentOptions(image_size=8, label_size=4, flip_probability=0.0)
  half = augment.AugmentOptions(image_size=8, label_size=4)
  flips = {name: [bool(augment.sample_window_and_flip(augment.example_seed(3, i), (8, 8), o,
                                                      train=True)[1]) for i in range(100)]
           for name, o in (("always", always), ("never", never), ("half", half))}
  assert all(flips["always"]) and not any(flips["never"])
  assert 30 <= sum(flips["half"]) <= 70


def test_options_validation_names_the_field():
  with pytest.raises(ValueError, match="crop_scale"):
    augment.AugmentOptions(image_size=8, label_size=4, crop_scale=(0.5, 1.5))
  with pytest.raises(ValueError, match="crop_ratio"):
    augment.AugmentOptions(image_size=8, label_size=4, crop_ratio=(0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# The NumPy twins (augment_np, run in the grain loader's workers) against the TF ops above.


def test_numpy_random_window_respects_scale_and_ratio_and_is_seeded_by_position():
  from clipzoo_jax.data import augment_np
  scale, ratio = (0.3, 0.9), (0.6, 1.5)
  areas, aspects = [], []
  for position in range(200):
    window = augment_np.random_crop_window(augment_np.example_rng(11, position), (60, 80),
                                           scale, ratio)
    again = augment_np.random_crop_window(augment_np.example_rng(11, position), (60, 80),
                                          scale, ratio)
    np.testing.assert_array_equal(window, again)
    y0, x0, h, w = window
    assert 0 <= y0 and y0 + h <= 1 + 1e-9 and 0 <= x0 and x0 + w <= 1 + 1e-9
    areas.append(h * w)
    aspects.append((w * 80) / (h * 60))
  assert scale[0] - 1e-9 <= min(areas) and max(areas) <= scale[1] + 1e-9
  assert ratio[0] - 1e-9 <= min(aspects) and max(aspects) <= ratio[1] + 1e-9
  assert np.std(areas) > 0.05
  fallback = augment_np.random_crop_window(augment_np.example_rng(0), (30, 30), (1.0, 1.0),
                                           (2.0, 2.0))
  np.testing.assert_allclose(fallback, [0.25, 0.0, 0.5, 1.0])


@pytest.mark.parametrize("in_hw,size,flip", [((12, 16), 8, False), ((7, 9), 5, True),
                                             ((30, 20), 11, True)])
def test_numpy_nearest_and_box_transforms_equal_the_tf_ops(in_hw, size, flip):
  from clipzoo_jax.data import augment_np
  rng = np.random.default_rng(sum(in_hw) + size)
  label = rng.integers(0, 50, (*in_hw, 3)).astype(np.int32)
  boxes = np.sort(rng.uniform(0, 1, (6, 2, 2)), axis=1).transpose(0, 2, 1).reshape(6, 4)
  boxes = boxes[:, [0, 2, 1, 3]].astype(np.float32)
  classes, scores = np.arange(6), rng.uniform(size=6).astype(np.float32)
  options = augment.AugmentOptions(image_size=size, label_size=size, max_boxes=4)
  for _ in range(5):
    window = augment_np.snap_window(
        augment_np.random_crop_window(rng, in_hw, (0.2, 1.0), (0.5, 2.0)), in_hw)
    tf_window = tf.constant(window, tf.float32)
    np.testing.assert_array_equal(
        augment_np.crop_resize_nearest(label, window.astype(np.float32), size, flip),
        augment.crop_resize_nearest(tf.constant(label), tf_window, size, tf.constant(flip)))
    ours = augment_np.augment_boxes(boxes, classes, scores, window.astype(np.float32), flip,
                                    options)
    theirs = augment.augment_boxes(tf.constant(boxes), tf.constant(classes), tf.constant(scores),
                                   tf_window, tf.constant(flip), options)
    np.testing.assert_allclose(ours[0], theirs[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(ours[1], theirs[1].numpy())


def test_numpy_image_crop_is_the_snapped_pixel_slice_resized_by_pillow():
  from clipzoo_jax.data import augment_np
  rng = np.random.default_rng(5)
  pixels = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
  window = augment_np.snap_window(np.array([0.26, 0.1, 0.5, 0.6]), (20, 30))
  y0, x0, h, w = augment_np.pixel_box(window, (20, 30))
  expected = np.asarray(Image.fromarray(pixels[y0:y0 + h, x0:x0 + w]).resize(
      (12, 12), Image.Resampling.BILINEAR))
  got = augment_np.crop_resize_image(Image.fromarray(pixels), window, 12, flip=False)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(
      augment_np.crop_resize_image(Image.fromarray(pixels), window, 12, flip=True),
      expected[:, ::-1])
