"""Boxes from the dense detection outputs (CenterNet's decoding): class heatmap peaks that are the
maximum of their 3x3 neighbourhood, the best `max_detections` of them over all classes, each with
the box size and centre offset predicted at its cell. The inverse of `tasks.det.det_targets`, with
static shapes so it runs under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def heatmap_peaks(heatmap):
  """`heatmap` (B, H, W, C) with every value that is not a 3x3 local maximum set to 0."""
  pooled = jax.lax.reduce_window(heatmap, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                                 "SAME")
  return jnp.where(heatmap >= pooled, heatmap, 0.0)


def decode_boxes(heatmap_logits, size, offset, max_detections: int):
  """-> boxes (B, K, 4) normalized ymin, xmin, ymax, xmax (clipped to the image), scores (B, K)
  (sigmoid of the peak; 0 where fewer than K peaks exist), classes (B, K) int32.

  heatmap_logits (B, H, W, C); size (B, H, W, 2) box height, width as fractions of the image;
  offset (B, H, W, 2) centre offset from the cell's corner, in cells (`det_targets`' layout).
  """
  batch, height, width, classes = heatmap_logits.shape
  peaks = heatmap_peaks(jax.nn.sigmoid(heatmap_logits.astype(jnp.float32)))
  k = min(int(max_detections), height * width * classes)
  scores, index = jax.lax.top_k(peaks.reshape(batch, -1), k)
  cell, cls = index // classes, index % classes
  row, col = cell // width, cell % width
  images = jnp.arange(batch)[:, None]
  box_size, box_offset = size[images, row, col], offset[images, row, col]
  centre_y = (row + box_offset[..., 0]) / height
  centre_x = (col + box_offset[..., 1]) / width
  half_h, half_w = box_size[..., 0] / 2, box_size[..., 1] / 2
  boxes = jnp.stack([centre_y - half_h, centre_x - half_w, centre_y + half_h, centre_x + half_w],
                    -1)
  return jnp.clip(boxes, 0.0, 1.0), scores, cls.astype(jnp.int32)
