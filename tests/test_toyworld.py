"""Toy world: determinism, ground truth against geometry derived here, captions, resumable
writing."""

import json
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from clipzoo_jax.data import records, shards, toyworld

SIZE = 48
SCENES = [toyworld.render_scene(5, i, SIZE) for i in range(24)]


def camera_frame_rays(camera):
  """(size, size, 3) ray directions with z = 1 through pixel centres, written out per axis."""
  rows, cols = np.mgrid[0:camera.size, 0:camera.size]
  x = (cols + 0.5 - camera.size / 2) / camera.focal
  y = (rows + 0.5 - camera.size / 2) / camera.focal
  return np.stack([x, y, np.ones_like(x)], axis=-1)


def world_to_camera(point, camera):
  """A world point (x right, y forward, z up) in the OpenCV frame of a camera pitched down."""
  x, y, z = point[0], point[1], point[2] - camera.height
  c, s = np.cos(camera.pitch), np.sin(camera.pitch)
  return np.array([x, -s * y - c * z, c * y - s * z])


def test_same_seed_and_index_render_identical_bytes():
  again = toyworld.render_scene(5, 3, SIZE)
  first = SCENES[3]
  assert again.image.tobytes() == first.image.tobytes()
  assert again.caption == first.caption
  for name in ("seg", "depth", "normals", "det_boxes", "det_classes"):
    assert getattr(again.labels, name).tobytes() == getattr(first.labels, name).tobytes(), name
  assert toyworld.render_scene(5, 4, SIZE).image.tobytes() != first.image.tobytes()
  assert toyworld.render_scene(6, 3, SIZE).image.tobytes() != first.image.tobytes()


def test_keys_round_trip_and_foreign_keys_are_rejected():
  assert toyworld.key_for(3, 42) == "toyworld-s3-00000042"
  assert toyworld.parse_key(toyworld.key_for(7, 123456)) == (7, 123456)
  assert SCENES[2].key == toyworld.key_for(5, 2)
  with pytest.raises(ValueError, match="not a toy-world key"):
    toyworld.parse_key("cc3m-000001")


def test_label_shapes_and_unit_normals():
  for scene in SCENES:
    labels = scene.labels
    assert scene.image.shape == (SIZE, SIZE, 3) and scene.image.dtype == np.uint8
    assert labels.seg.shape == (SIZE, SIZE) and labels.seg.max() < len(toyworld.SEG_CLASSES)
    assert labels.depth.dtype == np.float32 and (labels.depth > 0).all()
    assert labels.normals.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(labels.normals, axis=-1), 1.0, atol=1e-5)
    # Surfaces face the camera: a normal never points along the viewing ray.
    rays = camera_frame_rays(scene.camera)
    assert (np.einsum("hwc,hwc->hw", rays, labels.normals) < 1e-6).all()


def test_floor_and_back_wall_match_their_planes():
  checked = 0
  for scene in SCENES:
    camera, room = scene.camera, scene.room
    c, s = np.cos(camera.pitch), np.sin(camera.pitch)
    ray_y = camera_frame_rays(camera)[..., 1]
    floor = scene.labels.seg == 0
    # Floor z = 0 is `height` below the camera along world up = (0, -cos, -sin) in camera frame.
    np.testing.assert_allclose(scene.labels.depth[floor], (camera.height / (c * ray_y + s))[floor],
                               rtol=1e-5)
    np.testing.assert_allclose(scene.labels.normals[floor],
                               np.broadcast_to([0, -c, -s], (floor.sum(), 3)), atol=1e-6)
    if room.side_wall_x is None:
      wall = scene.labels.seg == 1
      np.testing.assert_allclose(scene.labels.depth[wall],
                                 (room.back_wall_y / (c - s * ray_y))[wall], rtol=1e-5)
      np.testing.assert_allclose(scene.labels.normals[wall],
                                 np.broadcast_to([0, s, -c], (wall.sum(), 3)), atol=1e-6)
      checked += 1
  assert checked >= 3


def test_sphere_normals_point_from_the_centre():
  spheres = 0
  for scene in SCENES:
    points = camera_frame_rays(scene.camera) * scene.labels.depth[..., None]
    for i, obj in enumerate(scene.objects):
      mask = scene.instances == i
      if obj.shape != "sphere" or not mask.any():
        continue
      centre = world_to_camera(obj.centre, scene.camera)
      offsets = points[mask] - centre
      np.testing.assert_allclose(np.linalg.norm(offsets, axis=-1), obj.size[0], rtol=1e-4)
      np.testing.assert_allclose(scene.labels.normals[mask], offsets / obj.size[0], atol=1e-4)
      assert (scene.labels.seg[mask] == toyworld.SEG_CLASSES.index("sphere")).all()
      spheres += 1
  assert spheres >= 5


def test_cylinder_top_and_box_faces_are_planar():
  checked = 0
  for scene in SCENES:
    points = camera_frame_rays(scene.camera) * scene.labels.depth[..., None]
    up = world_to_camera((0, 0, 1 + scene.camera.height), scene.camera)  # world up, as a direction
    for i, obj in enumerate(scene.objects):
      mask = scene.instances == i
      normals, pts = scene.labels.normals[mask], points[mask]
      if obj.shape == "cylinder":
        top = normals @ up > 0.999
        top_height = world_to_camera((0, 0, obj.size[1]), scene.camera)
        # Top-cap points lie in the plane z = height: their offset from it is orthogonal to up.
        np.testing.assert_allclose((pts[top] - top_height) @ up, 0.0, atol=1e-4)
        side = ~top
        axis_point = world_to_camera((obj.centre[0], obj.centre[1], 0.0), scene.camera)
        radial = (pts[side] - axis_point) - np.outer((pts[side] - axis_point) @ up, up)
        np.testing.assert_allclose(np.linalg.norm(radial, axis=-1), obj.size[0], rtol=1e-4)
        checked += 1
      if obj.shape == "box":
        centre = world_to_camera(obj.centre, scene.camera)
        # Each face is at distance half-extent from the centre along its own normal.
        distances = np.einsum("nc,nc->n", pts - centre, normals)
        gaps = np.abs(distances[:, None] - np.asarray(obj.size)[None])
        assert np.all(gaps.min(axis=1) < 1e-4)
        checked += 1
  assert checked >= 5


def test_boxes_hold_exactly_the_visible_pixels():
  for scene in SCENES:
    counts = np.bincount(scene.instances[scene.instances >= 0], minlength=len(scene.objects))
    assert scene.visible == tuple(i for i in range(len(scene.objects)) if counts[i] >= 4)
    labels = scene.labels
    assert labels.det_boxes.shape == (len(scene.visible), 4)
    np.testing.assert_array_equal(labels.det_scores, 1.0)
    for box, cls, i in zip(labels.det_boxes, labels.det_classes, scene.visible):
      assert toyworld.DET_CLASSES[cls] == scene.objects[i].shape
      rows, cols = np.nonzero(scene.instances == i)
      ymin, xmin, ymax, xmax = box * SIZE
      assert (rows + 0.5 > ymin).all() and (rows + 0.5 < ymax).all()
      assert (cols + 0.5 > xmin).all() and (cols + 0.5 < xmax).all()
      # Tight: each edge is within one pixel of a visible pixel centre.
      assert rows.min() == ymin and rows.max() + 1 == ymax
      assert cols.min() == xmin and cols.max() + 1 == xmax
      assert (labels.seg[rows, cols] == toyworld.SEG_CLASSES.index(scene.objects[i].shape)).all()
    room = scene.instances < 0
    assert np.isin(labels.seg[room], [0, 1]).all()


def test_captions_describe_visible_objects_and_their_relations():
  shape = "(sphere|box|cylinder)"
  relation_re = re.compile(rf"^an? (\w+) {shape} (left of|right of|in front of|behind|next to) "
                           rf"an? (\w+) {shape}")
  relations = 0
  for scene in SCENES + [toyworld.render_scene(9, i, SIZE) for i in range(40)]:
    for i, obj in enumerate(scene.objects):
      phrase = f"{obj.colour} {obj.shape}"
      assert (phrase in scene.caption) == (i in scene.visible), (scene.caption, phrase)
    match = relation_re.match(scene.caption)
    if not match:
      continue
    by_phrase = {f"{scene.objects[i].colour} {scene.objects[i].shape}": i for i in scene.visible}
    a, b = by_phrase[f"{match[1]} {match[2]}"], by_phrase[f"{match[4]} {match[5]}"]
    x = {i: np.nonzero(scene.instances == i)[1].mean() for i in (a, b)}
    z = {i: world_to_camera(scene.objects[i].centre, scene.camera)[2] for i in (a, b)}
    expected = {"left of": x[a] < x[b], "right of": x[a] > x[b], "in front of": z[a] < z[b],
                "behind": z[a] > z[b], "next to": True}[match[3]]
    assert expected, scene.caption
    relations += 1
  assert relations >= 5


def read_records(directory):
  import tensorflow as tf
  examples = []
  for path in shards.shard_paths(directory):
    for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
      examples.append(records.parse_example(serialized))
  return examples


@pytest.mark.slow
def test_written_dataset_round_trips_and_verifies(tmp_path):
  directory = str(tmp_path / "toy")
  manifest = toyworld.write_dataset(directory, 10, seed=2, size=32, num_shards=3, verbose=False)
  assert shards.verify(directory) == []
  assert manifest["num_records"] == 10 and len(manifest["shards"]) == 3
  assert manifest["shards"][0]["path"] == shards.shard_name("train", 0, 3)
  assert manifest["toyworld"] == {"seed": 2, "size": 32, "num_examples": 10, "split": "train",
                                  "num_shards": 3, "jpeg_quality": 95}
  assert manifest["tasks"]["seg"]["classes"] == list(toyworld.SEG_CLASSES)
  assert manifest["tasks"]["det"]["classes"] == list(toyworld.DET_CLASSES)
  assert manifest["tasks"]["depth"]["depth_kind"] == "metric"
  assert manifest["tasks"]["normals"]["expert"]["name"] == "toyworld-ground-truth"
  assert not os.path.exists(os.path.join(directory, toyworld.PARAMS_NAME))
  examples = read_records(directory)
  assert [e["key"] for e in examples] == [toyworld.key_for(2, i) for i in range(10)]
  for example in examples:
    scene = toyworld.render_scene(*toyworld.parse_key(example["key"]), size=32)
    assert example["text"] == scene.caption
    np.testing.assert_array_equal(example["labels"].seg, scene.labels.seg)
    np.testing.assert_allclose(example["labels"].depth, scene.labels.depth,
                               atol=example["depth_scale"] / 2 + 1e-6)
    np.testing.assert_array_equal(example["labels"].det_boxes, scene.labels.det_boxes)
    jpeg = records.encode_jpeg(scene.image, quality=95)
    np.testing.assert_array_equal(example["image"], records.decode_jpeg(jpeg))


@pytest.fixture
def written(tmp_path):
  directory = str(tmp_path / "toy")
  manifest = toyworld.write_dataset(directory, 9, seed=1, size=24, num_shards=3, verbose=False)
  return directory, manifest


def spy_on_shard_writes(monkeypatch):
  calls = []
  original = toyworld._write_shard

  def spy(path, *args):
    calls.append(os.path.basename(path))
    return original(path, *args)

  monkeypatch.setattr(toyworld, "_write_shard", spy)
  return calls


def test_second_write_is_a_no_op(written, monkeypatch):
  directory, manifest = written
  calls = spy_on_shard_writes(monkeypatch)
  again = toyworld.write_dataset(directory, 9, seed=1, size=24, num_shards=3, verbose=False)
  assert calls == [] and again == manifest


def test_resume_redoes_only_the_incomplete_shard(written, monkeypatch):
  directory, manifest = written
  killed = os.path.join(directory, manifest["shards"][1]["path"])
  os.remove(shards.sidecar_path(killed))
  with open(killed + ".tmp-999", "wb") as f:  # debris of a killed writer
    f.write(b"partial")
  calls = spy_on_shard_writes(monkeypatch)
  again = toyworld.write_dataset(directory, 9, seed=1, size=24, num_shards=3, verbose=False)
  assert calls == [manifest["shards"][1]["path"]]
  assert again["shards"] == manifest["shards"]  # deterministic: identical bytes again
  assert shards.verify(directory) == []
  assert not any(".tmp-" in name for name in os.listdir(directory))


def test_other_params_in_an_existing_directory_are_an_error(written):
  directory, _ = written
  with pytest.raises(ValueError, match=r"manifest.json.*'seed': 1.*'seed': 2"):
    toyworld.write_dataset(directory, 9, seed=2, size=24, num_shards=3, verbose=False)


def test_interrupted_run_keeps_its_params(tmp_path):
  directory = str(tmp_path / "toy")
  os.makedirs(directory)
  params = {"seed": 0, "size": 24, "num_examples": 4, "split": "train", "num_shards": 2,
            "jpeg_quality": 95}
  with open(os.path.join(directory, toyworld.PARAMS_NAME), "w") as f:
    json.dump(params, f)
  with pytest.raises(ValueError, match="toyworld_params.json"):
    toyworld.write_dataset(directory, 4, seed=0, size=32, num_shards=2, verbose=False)
  manifest = toyworld.write_dataset(directory, 4, seed=0, size=24, num_shards=2, verbose=False)
  assert manifest["num_records"] == 4


def test_foreign_directory_is_refused(tmp_path):
  (tmp_path / "other-00000-of-00001.tfrecord").write_bytes(b"")
  with pytest.raises(ValueError, match="not a toy-world dataset"):
    toyworld.write_dataset(str(tmp_path), 4, verbose=False)
