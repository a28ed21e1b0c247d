"""Pictures of the paper in miniature: the zoo's pseudo-labels next to the toy world's truth, and
the dense probes' predictions of each model next to the truth."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipzoo_jax import atomic_files
from clipzoo_jax import visualize
from clipzoo_jax.data import shards
from clipzoo_jax.data import toyworld

PANEL = 128


def truth_record(key: str, size: int) -> dict:
  """The toy world's own record of a corpus key: its true caption and exact labels."""
  seed, index = toyworld.parse_key(key)
  scene = toyworld.render_scene(seed, index, size)
  return {"key": key, "text": scene.caption, "image": scene.image, "labels": scene.labels}


def _label(row: Image.Image, text: str) -> Image.Image:
  out = Image.new("RGB", (row.width + 96, row.height), (255, 255, 255))
  out.paste(row, (96, 0))
  ImageDraw.Draw(out).text((4, 4), text, fill=(0, 0, 0), font=ImageFont.load_default())
  return out


def pseudo_labels_vs_truth(directory: str, output: str, num: int = 4) -> str:
  """PNG: for `num` records of the pseudo-labelled `directory`, the experts' row (image with
  boxes, seg, depth, normals; the corpus caption) above the toy world's true row."""
  manifest = shards.read_manifest(directory)
  found = visualize.read_records(directory, num)
  rows = []
  for record in found:
    size = record["image"].shape[0]
    truth = truth_record(record["key"], size)
    truth_manifest = {"tasks": {name: entry for name, entry in toyworld.manifest_tasks(size).items()
                                if name in manifest["tasks"]}}
    rows.append(_label(visualize.render_row(record, manifest, PANEL), "experts"))
    rows.append(_label(visualize.render_row(truth, truth_manifest, PANEL), "truth"))
  width = max(r.width for r in rows)
  grid = Image.new("RGB", (width, sum(r.height for r in rows)), (255, 255, 255))
  top = 0
  for row in rows:
    grid.paste(row, (0, top))
    top += row.height
  atomic_files.write_bytes(output, _png(np.asarray(grid)))
  return output


def _png(array: np.ndarray) -> bytes:
  import io  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


PROBE_TASKS = ("seg", "depth", "normals")


def _probe_panel(task: str, array: np.ndarray, num_classes: int) -> np.ndarray:
  if task == "seg":
    return visualize.colorize_seg(array.astype(np.int64), num_classes)
  if task == "depth":
    depth = np.asarray(array, np.float64).squeeze()
    finite = np.isfinite(depth)
    low = depth[finite].min() if finite.any() else 0.0
    return visualize.colorize_depth(np.where(finite, depth - low + 1.0, 0.0))  # any scale, shown
  normals = np.asarray(array, np.float64)
  norm = np.linalg.norm(normals, axis=-1, keepdims=True)
  return visualize.colorize_normals(np.where(norm > 0, normals / np.maximum(norm, 1e-12), 0))


def probe_predictions(runs: list[tuple[str, str]], output: str, num: int = 3,
                      panel: int = 96) -> str | None:
  """PNG: per dense probe (seg, depth, normals) and held-out image, the image, the truth and each
  run's probe prediction side by side (`runs`: (label, workdir) whose probes saved examples,
  `dense_probe` option `save_examples`). None when no run has examples."""
  found = {}
  for label, workdir in runs:
    for task in PROBE_TASKS:
      path = os.path.join(workdir, "probe_examples", f"{task}_probe.npz")
      if os.path.exists(path):
        with np.load(path) as data:
          found[(label, task)] = {k: data[k] for k in data.files}
  if not found:
    return None
  labels = [label for label, _ in runs]
  num_classes = len(toyworld.SEG_CLASSES)
  header = ["image", "truth"] + labels
  rows = []
  for task in PROBE_TASKS:
    first = next((found[(l, task)] for l in labels if (l, task) in found), None)
    if first is None:
      continue
    for i in range(min(num, len(first["image"]))):
      image = np.asarray(first["image"][i])
      image = np.clip(image * (255.0 if image.max() <= 1.5 else 1.0), 0, 255).astype(np.uint8)
      cells = [image, _probe_panel(task, first[f"label/{task}"][i], num_classes)]
      for label in labels:
        example = found.get((label, task))
        cells.append(_probe_panel(task, example[f"prediction/{task}"][i], num_classes)
                     if example is not None else np.full((8, 8, 3), 96, np.uint8))
      rows.append((f"{task} probe", [Image.fromarray(c).resize((panel, panel), Image.NEAREST)
                                     for c in cells]))
  title_height, margin = 14, 70
  grid = Image.new("RGB", (margin + panel * len(header), title_height + panel * len(rows)),
                   (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  font = ImageFont.load_default()
  for column, name in enumerate(header):
    draw.text((margin + column * panel + 2, 1), name, fill=(0, 0, 0), font=font)
  for row, (name, cells) in enumerate(rows):
    top = title_height + row * panel
    draw.text((2, top + panel // 2 - 6), name, fill=(0, 0, 0), font=font)
    for column, cell in enumerate(cells):
      grid.paste(cell, (margin + column * panel, top))
  atomic_files.write_bytes(output, _png(np.asarray(grid)))
  return output
