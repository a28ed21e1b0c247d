"""The label grid: each panel shows the stored labels in known colours at known places."""

import numpy as np
from PIL import Image

from clipzoo_jax import visualize
from clipzoo_jax.data import records, shards

PANEL = 32
MANIFEST = {"tasks": {"seg": {"classes": ["a", "b", "c"]}, "depth": {}, "normals": {},
                      "det": {"classes": ["thing", "other"]}}}


def _record():
  seg = np.zeros((16, 16), np.int64)
  seg[:, 8:] = 2
  seg[0, 0] = 255  # ignore
  depth = np.tile(np.linspace(1, 4, 16, dtype=np.float32), (16, 1))
  depth[15, 15] = 0  # invalid
  normals = np.zeros((16, 16, 3), np.float32)
  normals[:8] = (0, 0, -1)  # the lower half is invalid
  labels = records.Labels(seg=seg, depth=depth, normals=normals,
                          det_boxes=np.array([[0.25, 0.25, 0.75, 0.75]], np.float32),
                          det_classes=np.array([1]), det_scores=np.array([0.9], np.float32))
  image = np.full((32, 32, 3), 200, np.uint8)
  return {"key": "k", "image": image, "text": "a caption", "labels": labels}


def test_palette_is_distinct_and_keeps_black_for_ignore():
  colours = visualize.palette(150)
  assert len({tuple(c) for c in colours}) == 150
  assert not (colours == 0).all(axis=1).any()


def test_panels_show_labels_in_their_colours():
  grid = visualize.render_grid([_record()], MANIFEST, panel=PANEL)
  # columns: image+boxes, seg, depth, normals; labels (16 px) are scaled 2x like the image
  assert grid.shape[1] == 4 * PANEL and grid.shape[0] > PANEL
  seg_panel = grid[:PANEL, PANEL:2 * PANEL]
  colours = visualize.palette(3)
  assert (seg_panel[4:, :16] == colours[0]).all() and (seg_panel[:, 16:] == colours[2]).all()
  assert (seg_panel[:2, :2] == 0).all()  # ignored pixel: black
  depth_panel = grid[:PANEL, 2 * PANEL:3 * PANEL]
  assert (depth_panel[30:, 30:] == 0).all()  # invalid depth: black
  assert not np.array_equal(depth_panel[5, 0], depth_panel[5, 29])  # the gradient is coloured
  normals_panel = grid[:PANEL, 3 * PANEL:]
  assert (normals_panel[:16] == [128, 128, 0]).all() and (normals_panel[16:] == 0).all()
  image_panel = grid[:PANEL, :PANEL]
  box_colour = visualize.palette(2)[1]
  assert (image_panel[8, 8:24] == box_colour).all()  # the box's top edge at y = 0.25 * 32
  assert (image_panel[8:24, 8] == box_colour).all()
  assert (image_panel[2, 2] == 200).all()
  caption_band = grid[PANEL:]
  assert (caption_band < 100).any()  # the caption text is drawn


def test_absent_task_is_grey():
  record = _record()
  record["labels"].depth = None
  grid = visualize.render_grid([record], MANIFEST, panel=PANEL)
  assert (grid[:PANEL, 2 * PANEL:3 * PANEL] == visualize.ABSENT).all()


def test_visualize_directory_writes_the_grid(tmp_path):
  directory = str(tmp_path / "data")
  names = []
  for i in range(2):
    name = shards.shard_name("train", i, 2)
    with shards.ShardWriter(f"{directory}/{name}") as writer:
      for j in range(3):
        record = _record()
        key = f"k{i}{j}"
        writer.write(key, records.make_example(key, records.encode_jpeg(record["image"]),
                                               record["text"], record["labels"], num_seg_classes=3))
    names.append(name)
  shards.write_manifest(directory, MANIFEST["tasks"], names, "test")
  out = str(tmp_path / "grid.png")
  grid = visualize.visualize_directory(directory, out, num=2, shard=1, panel=PANEL)
  np.testing.assert_array_equal(np.asarray(Image.open(out)), grid)
  rows = visualize.read_records(directory, num=2, shard=1)
  assert [r["key"] for r in rows] == ["k10", "k11"]
  assert grid.shape[0] == 2 * visualize.render_row(rows[0], MANIFEST, PANEL).height
