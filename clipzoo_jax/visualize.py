"""Renders pseudo-labelled records as one PNG grid, to look at labels before spending a pod on them.

One row per record: the image with its boxes, the class map in a palette, depth colour-mapped,
normals as RGB (only the tasks of the manifest), and the caption under the row. Invalid pixels
(ignore class, invalid depth, invalid normals) are black; a task absent from a record is grey.
"""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipzoo_jax import cli
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.data import records, shards

PANEL = 192
CAPTION_LINE = 12  # pixels per caption line (Pillow's default bitmap font)
ABSENT = (96, 96, 96)


def read_records(directory: str, num: int, shard: int | None = None, skip: int = 0) -> list[dict]:
  """The first `num` records (after `skip`) of a dataset directory, or of one of its shards."""
  import tensorflow as tf
  paths = shards.shard_paths(directory)
  if shard is not None:
    if not 0 <= shard < len(paths):
      raise cli.UserError(f"{directory}: shard {shard} out of range; the manifest lists {len(paths)}")
    paths = [paths[shard]]
  dataset = tf.data.TFRecordDataset(paths).skip(skip).take(num)
  return [records.parse_example(s) for s in dataset.as_numpy_iterator()]


def palette(num_classes: int) -> np.ndarray:
  """(num_classes, 3) uint8 colours, the PASCAL VOC bit-interleaved palette (class 0 is black,
  so it is shifted by one: black stays reserved for ignored pixels)."""
  ids = np.arange(1, num_classes + 1)
  colours = np.zeros((num_classes, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      colours[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
  return colours.astype(np.uint8)


def colorize_seg(class_map: np.ndarray, num_classes: int) -> np.ndarray:
  colours = np.concatenate([palette(num_classes), np.zeros((1, 3), np.uint8)])
  return colours[np.where((class_map >= 0) & (class_map < num_classes), class_map, num_classes)]


def colorize_depth(depth: np.ndarray) -> np.ndarray:
  """Turbo colour map over the 2-98th percentile of valid values; invalid (0) is black."""
  from matplotlib import colormaps
  valid = np.isfinite(depth) & (depth > 0)
  if not valid.any():
    return np.zeros(depth.shape + (3,), np.uint8)
  low, high = np.percentile(depth[valid], [2, 98])
  scaled = np.clip((depth - low) / max(high - low, 1e-12), 0, 1)
  rgb = (colormaps["turbo"](scaled)[..., :3] * 255).round().astype(np.uint8)
  return np.where(valid[..., None], rgb, 0).astype(np.uint8)


def colorize_normals(normals: np.ndarray) -> np.ndarray:
  """xyz in [-1, 1] -> RGB in [0, 255] (the stored encoding); invalid (all zero) is black."""
  valid = np.any(normals != 0, axis=-1)
  rgb = np.rint((np.clip(normals, -1, 1) + 1) * 127.5).astype(np.uint8)
  return np.where(valid[..., None], rgb, 0).astype(np.uint8)


def _fit(array: np.ndarray, panel: int, resample, shape=None) -> Image.Image:
  """The array scaled to fit a panel x panel square (aspect kept), on black. With `shape`, it
  is scaled as an array of that shape would be: labels line up with their image's panel."""
  height, width = (shape or array.shape)[:2]
  scale = panel / max(height, width)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  canvas = Image.new("RGB", (panel, panel))
  canvas.paste(Image.fromarray(array).resize(size, resample), (0, 0))
  return canvas


def draw_boxes(canvas: Image.Image, labels: records.Labels, image_shape, panel: int,
               class_names) -> None:
  """Boxes (normalized ymin, xmin, ymax, xmax) in each class's palette colour, with name and score."""
  if labels.det_boxes is None:
    return
  scale = panel / max(image_shape[:2])
  height, width = image_shape[0] * scale, image_shape[1] * scale
  colours = palette(max(len(class_names), int(labels.det_classes.max(initial=0)) + 1))
  draw = ImageDraw.Draw(canvas)
  for box, cls, score in zip(labels.det_boxes, labels.det_classes, labels.det_scores):
    y0, x0, y1, x1 = box * np.array([height, width, height, width])
    colour = tuple(int(c) for c in colours[cls])
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour)
    name = class_names[cls] if cls < len(class_names) else str(cls)
    draw.text((x0 + 2, y0 + 1), f"{name} {score:.2f}", fill=colour)


def _task_panel(record: dict, task, classes, panel: int) -> Image.Image:
  """The task's picture of its label, grey when this record has no such label."""
  if not task.has_label(record["labels"]):
    return Image.new("RGB", (panel, panel), ABSENT)
  rgb = task.label_image(record["labels"], classes)
  return _fit(rgb, panel, Image.NEAREST, shape=record["image"].shape)


def caption_lines(text: str, width_pixels: int) -> list[str]:
  return textwrap.wrap(text, max(8, width_pixels // 6))[:3] or [""]


def render_row(record: dict, manifest: dict, panel: int = PANEL) -> Image.Image:
  panels = [_fit(record["image"], panel, Image.BILINEAR)]
  for name in task_lib.canonical_order(manifest["tasks"]):
    task, classes = task_lib.get(name), manifest["tasks"][name].get("classes", [])
    if task.has_label(record["labels"]):
      task.draw_on_image(panels[0], record["labels"], record["image"].shape, panel, classes)
    if task.has_panel:
      panels.append(_task_panel(record, task, classes, panel))
  width = panel * len(panels)
  lines = caption_lines(f"{record['key']}: {record['text']}", width)
  row = Image.new("RGB", (width, panel + CAPTION_LINE * len(lines) + 4), (255, 255, 255))
  for i, image in enumerate(panels):
    row.paste(image, (i * panel, 0))
  draw = ImageDraw.Draw(row)
  for i, line in enumerate(lines):
    draw.text((2, panel + 2 + i * CAPTION_LINE), line, fill=(0, 0, 0), font=ImageFont.load_default())
  return row


def render_grid(records_: list[dict], manifest: dict, panel: int = PANEL) -> np.ndarray:
  """(H, W, 3) uint8: the rows of `records_` stacked."""
  rows = [render_row(r, manifest, panel) for r in records_]
  grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
  top = 0
  for row in rows:
    grid.paste(row, (0, top))
    top += row.height
  return np.asarray(grid)


def visualize_directory(directory: str, output: str, num: int = 8, shard: int | None = None,
                        skip: int = 0, panel: int = PANEL) -> np.ndarray:
  """Reads records of a dataset directory and writes their grid as a PNG to `output`."""
  found = read_records(directory, num, shard, skip)
  if not found:
    raise cli.UserError(f"{directory}: no records to show (num={num}, shard={shard}, skip={skip})")
  grid = render_grid(found, shards.read_manifest(directory), panel)
  Image.fromarray(grid).save(output)
  return grid
