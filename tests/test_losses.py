"""Each loss against an independent NumPy reference written with plain loops / closed forms."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from clipzoo_jax import losses
from clipzoo_jax.tasks import depth, det, normals, seg

RNG = np.random.default_rng(0)


def test_contrastive_matches_numpy_and_clamps_temperature():
  image, text = RNG.normal(size=(6, 8)), RNG.normal(size=(6, 8))
  for logit_scale in (math.log(1 / 0.07), 7.0):  # 7.0 > log(100): clamped
    scale = min(math.exp(logit_scale), 100.0)
    i = image / np.linalg.norm(image, axis=1, keepdims=True)
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = scale * i @ t.T
    row = [-(logits[k, k] - np.log(np.exp(logits[k]).sum())) for k in range(6)]
    col = [-(logits[k, k] - np.log(np.exp(logits[:, k]).sum())) for k in range(6)]
    expected = 0.5 * (np.mean(row) + np.mean(col))
    found = losses.contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(logit_scale))
    np.testing.assert_allclose(found, expected, rtol=1e-5)


def test_contrastive_is_low_for_matching_pairs():
  emb = RNG.normal(size=(8, 16))
  matched = losses.contrastive_loss(jnp.asarray(emb), jnp.asarray(emb), jnp.asarray(math.log(100)))
  shuffled = losses.contrastive_loss(jnp.asarray(emb), jnp.asarray(emb[::-1]),
                                     jnp.asarray(math.log(100)))
  assert matched < 0.1 < shuffled


def test_seg_cross_entropy_ignores_pixels_and_unlabelled_examples():
  logits = RNG.normal(size=(3, 4, 5, 6)).astype(np.float32)
  labels = RNG.integers(-1, 6, size=(3, 4, 5))
  mask = np.array([1.0, 0.0, 1.0])
  total, count = 0.0, 0
  for b in range(3):
    if not mask[b]:
      continue
    for y in range(4):
      for x in range(5):
        if labels[b, y, x] < 0:
          continue
        z = logits[b, y, x]
        total += -(z[labels[b, y, x]] - np.log(np.exp(z).sum()))
        count += 1
  found = seg.seg_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(found, total / count, rtol=1e-5)


def _ssi_reference(pred, target):
  """Per image: solve min_{s,t} sum (s p + t - d)^2 by least squares, divide by the variance."""
  values = []
  for p, d in zip(pred, target):
    valid = d > 0
    if valid.sum() < 2:
      continue
    a = np.stack([p[valid], np.ones(valid.sum())], 1)
    (s, t), *_ = np.linalg.lstsq(a, d[valid], rcond=None)
    residual = ((s * p[valid] + t - d[valid]) ** 2).sum()
    values.append(residual / ((d[valid] - d[valid].mean()) ** 2).sum())
  return np.mean(values)


def test_depth_ssi_matches_least_squares_reference():
  pred = RNG.normal(size=(3, 6, 7))
  target = RNG.uniform(1, 5, size=(3, 6, 7))
  target[0, :2] = 0.0  # invalid pixels
  found = depth.depth_ssi_loss(jnp.asarray(pred), jnp.asarray(target), jnp.ones(3))
  np.testing.assert_allclose(found, _ssi_reference(pred, target), rtol=1e-5)


def test_depth_ssi_is_invariant_to_scale_and_shift_and_skips_unlabelled():
  target = RNG.uniform(1, 5, size=(2, 5, 5))
  affine = 3.0 * target - 2.0
  assert float(depth.depth_ssi_loss(jnp.asarray(affine), jnp.asarray(target), jnp.ones(2))) < 1e-8
  pred = RNG.normal(size=(2, 5, 5))
  only_first = depth.depth_ssi_loss(jnp.asarray(pred), jnp.asarray(target), jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(only_first, _ssi_reference(pred[:1], target[:1]), rtol=1e-5)


def test_depth_silog_matches_reference():
  pred = RNG.normal(size=(2, 4, 4))
  target = RNG.uniform(0.5, 4, size=(2, 4, 4))
  target[1, 0] = 0
  per_image = []
  for p, d in zip(pred, target):
    valid = d > 0
    g = p[valid] - np.log(d[valid])
    per_image.append(np.sqrt(np.mean(g ** 2) - 0.85 * np.mean(g) ** 2))
  found = depth.depth_silog_loss(jnp.asarray(pred), jnp.asarray(target), jnp.ones(2))
  np.testing.assert_allclose(found, np.mean(per_image), rtol=1e-5)


def test_normals_angular_loss_matches_reference():
  pred = RNG.normal(size=(2, 3, 4, 3))
  target = RNG.normal(size=(2, 3, 4, 3))
  target /= np.linalg.norm(target, axis=-1, keepdims=True)
  target[0, 0, 0] = 0  # invalid
  values = []
  for b in range(2):
    for y in range(3):
      for x in range(4):
        if not target[b, y, x].any():
          continue
        p = pred[b, y, x] / np.linalg.norm(pred[b, y, x])
        values.append(1 - np.dot(p, target[b, y, x]))
  found = normals.normals_loss(jnp.asarray(pred), jnp.asarray(target), jnp.ones(2))
  np.testing.assert_allclose(found, np.mean(values), rtol=1e-5)
  assert float(normals.normals_loss(jnp.asarray(target), jnp.asarray(target), jnp.ones(2))) < 1e-6


def test_det_targets_put_peak_at_box_centre_with_sizes_and_offsets():
  boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [0, 0, 0, 0]]], np.float32)
  classes = np.array([[1, -1]])
  heatmap, cell, sizes, offsets, valid = det.det_targets(
      jnp.asarray(boxes), jnp.asarray(classes), 3, (16, 16))
  heatmap = np.asarray(heatmap)
  centre = (0.3 * 16, 0.4 * 16)
  assert tuple(np.asarray(cell)[0, 0]) == (int(centre[0]), int(centre[1]))
  assert heatmap[0, int(centre[0]), int(centre[1]), 1] == pytest.approx(1.0)
  assert heatmap[..., 0].max() == 0 and heatmap[..., 2].max() == 0  # other classes empty
  assert np.unravel_index(heatmap[0, ..., 1].argmax(), (16, 16)) == (4, 6)
  np.testing.assert_allclose(np.asarray(sizes)[0, 0], [0.4, 0.4], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(offsets)[0, 0], [centre[0] - 4, centre[1] - 6], atol=1e-5)
  assert list(np.asarray(valid)[0]) == [True, False]


def test_det_loss_focal_and_l1_terms_match_reference():
  height = width = 8
  logits = RNG.normal(size=(1, height, width, 2)).astype(np.float32)
  size_pred = RNG.uniform(size=(1, height, width, 2)).astype(np.float32)
  offset_pred = RNG.uniform(size=(1, height, width, 2)).astype(np.float32)
  boxes = np.array([[[0.25, 0.25, 0.75, 0.5]]], np.float32)
  classes = np.array([[0]])
  heatmap, cell, sizes, offsets, _ = [np.asarray(x) for x in det.det_targets(
      jnp.asarray(boxes), jnp.asarray(classes), 2, (height, width))]
  focal = 0.0
  for y in range(height):
    for x in range(width):
      for c in range(2):
        p = np.clip(1 / (1 + np.exp(-logits[0, y, x, c])), 1e-4, 1 - 1e-4)
        if heatmap[0, y, x, c] >= 1 - 1e-6:
          focal += -np.log(p) * (1 - p) ** 2
        else:
          focal += -np.log(1 - p) * p ** 2 * (1 - heatmap[0, y, x, c]) ** 4
  cy, cx = cell[0, 0]
  size_l1 = np.abs(size_pred[0, cy, cx] - sizes[0, 0]).sum()
  offset_l1 = np.abs(offset_pred[0, cy, cx] - offsets[0, 0]).sum()
  expected = focal + 5.0 * size_l1 + offset_l1
  found = det.det_loss(jnp.asarray(logits), jnp.asarray(size_pred), jnp.asarray(offset_pred),
                          jnp.asarray(boxes), jnp.asarray(classes), jnp.ones(1))
  np.testing.assert_allclose(found, expected, rtol=1e-4)


def test_det_heatmap_is_each_class_max_over_its_boxes_alone():
  """Overlapping boxes of one class keep the larger Gaussian per pixel; other classes, padding
  boxes and empty examples add nothing (the targets are scattered, not built per box)."""
  boxes = np.array([[[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.9, 0.7], [0.0, 0.5, 0.4, 1.0],
                     [0.2, 0.2, 0.4, 0.4]],
                    [[0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                     [0.1, 0.1, 0.2, 0.2]]], np.float32)
  classes = np.array([[2, 2, 0, -1], [1, -1, -1, -1]])
  size = (12, 10)
  heatmap = np.asarray(det.det_targets(jnp.asarray(boxes), jnp.asarray(classes), 3, size)[0])
  expected = np.zeros_like(heatmap)
  for b in range(2):
    for k in range(4):
      if classes[b, k] < 0:
        continue
      alone = det.det_targets(jnp.asarray(boxes[b:b + 1, k:k + 1]),
                              jnp.asarray(classes[b:b + 1, k:k + 1]), 3, size)[0]
      expected[b] = np.maximum(expected[b], np.asarray(alone)[0])
  np.testing.assert_allclose(heatmap, expected, rtol=1e-6, atol=1e-7)
  assert heatmap[0, ..., 2].max() == pytest.approx(1.0) and heatmap[0, ..., 1].max() == 0
  assert heatmap[1, ..., 1].max() == pytest.approx(1.0) and heatmap[1, ..., [0, 2]].max() == 0

def test_total_loss_is_contrastive_plus_weighted_tasks_and_requires_weights():
  outputs = {"image_embedding": jnp.asarray(RNG.normal(size=(2, 4))),
             "text_embedding": jnp.asarray(RNG.normal(size=(2, 4))),
             "logit_scale": jnp.asarray(2.0),
             "heads": {"seg": jnp.asarray(RNG.normal(size=(2, 3, 3, 4)))}}
  batch = {"seg": jnp.asarray(RNG.integers(0, 4, size=(2, 3, 3))), "seg_mask": jnp.ones(2)}
  total, metrics = losses.total_loss(outputs, batch, ("seg",), {"seg": 0.5})
  np.testing.assert_allclose(total, metrics["loss/contrastive"] + 0.5 * metrics["loss/seg"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="no weight for active tasks"):
    losses.total_loss(outputs, batch, ("seg",), {})
