"""The input pipeline: batch contract, label decoding, joint augmentation, determinism, resume,
per-process reading and global jax.Array batches (8 forced CPU devices, see conftest.py)."""

import json
import os
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from clipzoo_jax import sharding
from clipzoo_jax.data import augment, loader, records, shards

ALL_TASKS = list(records.TASKS)


class HashTokenizer:
  """Stand-in for the real tokenizer: words hashed into a small vocabulary, 0-padded."""

  def __init__(self, length: int = 6, vocab: int = 997):
    self.length, self.vocab = length, vocab

  def encode(self, texts):
    out = np.zeros((len(texts), self.length), np.int32)
    for row, text in enumerate(texts):
      ids = [zlib.crc32(w.encode()) % (self.vocab - 1) + 1 for w in text.split()][:self.length]
      out[row, :len(ids)] = ids
    return out


def _write_dataset(directory, shard_records, tasks=ALL_TASKS, num_seg_classes=254):
  """shard_records: per shard a list of (key, image, text, Labels)."""
  paths = []
  for index, items in enumerate(shard_records):
    path = os.path.join(directory, shards.shard_name("train", index, len(shard_records)))
    with shards.ShardWriter(path) as writer:
      for key, image, text, labels in items:
        jpeg = image if isinstance(image, bytes) else records.encode_jpeg(image)
        writer.write(key, records.make_example(key, jpeg, text, labels, num_seg_classes))
    paths.append(path)
  shards.write_manifest(directory, {t: {"expert": {"name": "test"}} for t in tasks}, paths, "test")
  return str(directory)


def _mixed_labels(i, rng, label_hw):
  """Record i carries a varying subset of tasks; some det labels have zero boxes."""
  h, w = label_hw
  labels = records.Labels()
  if i % 2 == 0:
    seg = rng.integers(0, 7, (h, w))
    seg[0, :] = 255  # stored ignore row
    labels.seg = seg
  if i % 3 != 0:
    depth = rng.uniform(0.5, 10.0, (h, w)).astype(np.float32)
    depth[:, 8] = 0.0  # invalid column (inside the eval central crop)
    labels.depth = depth
  if i % 4 != 1:
    labels.normals = rng.normal(size=(h, w, 3)).astype(np.float32)
  if i % 5 != 2:
    count = i % 3
    corners = np.sort(rng.uniform(0, 1, (count, 2, 2)), axis=1)
    labels.det_boxes = corners.transpose(0, 2, 1).reshape(count, 4)[:, [0, 2, 1, 3]]
    labels.det_classes = np.arange(count)
  return labels


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
  """3 shards x 4 records, 24x32 images, labels at half resolution, varying tasks present."""
  rng = np.random.default_rng(0)
  shard_records = [[(f"s{s}-r{r}", rng.integers(0, 256, (24, 32, 3)).astype(np.uint8),
                     f"caption {s} {r} words", _mixed_labels(4 * s + r, rng, (12, 16)))
                    for r in range(4)] for s in range(3)]
  return _write_dataset(tmp_path_factory.mktemp("mixed"), shard_records)


def _square_record(key, rng):
  seg = rng.integers(0, 5, (16, 16))
  seg[3, :5] = 255
  depth = rng.uniform(1, 5, (16, 16)).astype(np.float32)
  depth[5, 5] = 0.0
  normals = rng.normal(size=(16, 16, 3)).astype(np.float32)
  normals[2, 7] = 0.0
  boxes = np.array([[0.1, 0.2, 0.4, 0.3], [0.5, 0.0, 0.9, 0.6]], np.float32)
  labels = records.Labels(seg=seg, depth=depth, normals=normals, det_boxes=boxes,
                          det_classes=np.array([3, 7]), det_scores=np.array([0.4, 0.8]))
  return key, rng.integers(0, 256, (16, 16, 3)).astype(np.uint8), f"square {key}", labels


@pytest.fixture(scope="module")
def square_dir(tmp_path_factory):
  """One shard of 6 square records with every label at image resolution (16 px)."""
  rng = np.random.default_rng(1)
  items = [_square_record(f"q{i}", rng) for i in range(6)]
  return _write_dataset(tmp_path_factory.mktemp("square"), [items])


def _config(directory, **overrides):
  config = {"directory": directory, "image_size": 16, "label_size": 8, "shuffle_buffer": 8,
            "num_parallel_calls": 2}
  config.update(overrides)
  return config


def _pipeline(directory, batch=4, tasks=ALL_TASKS, seed=0, index=0, count=1, train=True,
              **overrides):
  return loader.InputPipeline(_config(directory, **overrides), HashTokenizer(), batch, tasks,
                              seed=seed, process_index=index, process_count=count, train=train)


def _by_key(directory):
  found = {}
  for path in shards.shard_paths(directory):
    import tensorflow as tf
    for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
      parsed = records.parse_example(serialized)
      found[parsed["key"]] = parsed
  return found


def _take(pipeline, n):
  batches, keys = [], []
  for _ in range(n):
    batches.append(next(pipeline))
    keys.append(list(pipeline.last_keys))
  return batches, keys


# ---------------------------------------------------------------------------------------------
# The batch contract.


def test_batch_contract_shapes_and_dtypes(mixed_dir):
  batch = next(_pipeline(mixed_dir, batch=4, max_boxes=5))
  expected = {
      "image": ((4, 16, 16, 3), np.uint8), "tokens": ((4, 6), np.int32),
      "seg": ((4, 8, 8), np.int32), "depth": ((4, 8, 8), np.float32),
      "normals": ((4, 8, 8, 3), np.float32), "det_boxes": ((4, 5, 4), np.float32),
      "det_classes": ((4, 5), np.int32),
      **{f"{t}_mask": ((4,), np.float32) for t in ALL_TASKS}}
  assert sorted(batch) == sorted(expected)
  for name, (shape, dtype) in expected.items():
    assert batch[name].shape == shape and batch[name].dtype == dtype, name


def test_only_active_tasks_are_in_the_batch(mixed_dir):
  batch = next(_pipeline(mixed_dir, tasks=["depth"]))
  assert sorted(batch) == ["depth", "depth_mask", "image", "tokens"]


def test_masks_and_ignore_values_follow_presence(mixed_dir):
  reference = _by_key(mixed_dir)
  pipeline = _pipeline(mixed_dir, batch=4, train=False)
  seen = 0
  for batch in pipeline:
    for row, key in enumerate(pipeline.last_keys):
      labels = reference[key]["labels"]
      for task in ALL_TASKS:
        assert batch[f"{task}_mask"][row] == float(task in labels.tasks()), (key, task)
      seg = batch["seg"][row]
      if labels.seg is None:
        assert (seg == -1).all()
      else:
        assert seg.min() >= -1 and seg.max() < 7
        assert (seg == -1).any()  # the stored ignore row, never a fake class
      if labels.depth is None:
        assert (batch["depth"][row] == 0).all()
      else:
        assert (batch["depth"][row] == 0).any() and batch["depth"][row].max() > 0.5
      norms = np.linalg.norm(batch["normals"][row], axis=-1)
      if labels.normals is None:
        assert (norms == 0).all()
      else:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
      if labels.det_boxes is None or len(labels.det_boxes) == 0:
        assert (batch["det_classes"][row] == -1).all()
      seen += 1
  assert seen == 12  # eval mode: one pass, every record once


def test_zero_box_detection_is_a_label_not_an_absence(mixed_dir):
  reference = _by_key(mixed_dir)
  pipeline = _pipeline(mixed_dir, batch=12, train=False)
  batch = next(pipeline)
  keys = pipeline.last_keys
  empty = [i for i, k in enumerate(keys) if reference[k]["labels"].det_boxes is not None
           and len(reference[k]["labels"].det_boxes) == 0]
  absent = [i for i, k in enumerate(keys) if reference[k]["labels"].det_boxes is None]
  assert empty and absent
  np.testing.assert_array_equal(batch["det_mask"][empty], 1.0)
  np.testing.assert_array_equal(batch["det_mask"][absent], 0.0)


def test_eval_identity_view_matches_the_numpy_decoders(square_dir):
  """Square records, label_size = stored size, eval central crop = whole image: no resampling."""
  reference = _by_key(square_dir)
  pipeline = _pipeline(square_dir, batch=6, train=False, label_size=16)
  batch = next(pipeline)
  for row, key in enumerate(pipeline.last_keys):
    ref = reference[key]
    labels = ref["labels"]
    # Same libjpeg accurate IDCT as PIL: the same pixels (uint8; the model normalizes them).
    np.testing.assert_array_equal(batch["image"][row], ref["image"])
    np.testing.assert_array_equal(batch["seg"][row], np.where(labels.seg == 255, -1, labels.seg.astype(np.int32)))
    np.testing.assert_array_equal(batch["depth"][row], labels.depth)
    np.testing.assert_allclose(batch["normals"][row], labels.normals, atol=1e-6)
    np.testing.assert_array_equal(batch["tokens"][row], HashTokenizer().encode([ref["text"]])[0])
    order = np.argsort(-labels.det_scores, kind="stable")
    np.testing.assert_allclose(batch["det_boxes"][row, :2], labels.det_boxes[order], atol=1e-6)
    np.testing.assert_array_equal(batch["det_classes"][row], [7, 3] + [-1] * 14)


def test_sixteen_bit_segmentation_keeps_class_255(tmp_path):
  rng = np.random.default_rng(2)
  seg = rng.integers(0, 300, (8, 8))
  seg[0, 0], seg[1, 1] = 255, 65535  # 255 is a real class past 255 classes; 65535 is ignore
  labels = records.Labels(seg=seg)
  image = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
  directory = _write_dataset(tmp_path, [[("k", image, "t", labels)]], ["seg"], num_seg_classes=300)
  batch = next(_pipeline(directory, batch=1, tasks=["seg"], train=False, image_size=8))
  assert batch["seg"][0, 0, 0] == 255 and batch["seg"][0, 1, 1] == -1
  np.testing.assert_array_equal(batch["seg"][0], np.where(seg == 65535, -1, seg))


# ---------------------------------------------------------------------------------------------
# Joint augmentation end to end.


def test_forced_flip_mirrors_every_label(square_dir):
  reference = _by_key(square_dir)
  common = dict(batch=6, label_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  flipped_pipeline = _pipeline(square_dir, flip_probability=1.0, **common)
  plain_pipeline = _pipeline(square_dir, flip_probability=0.0, **common)
  flipped, plain = next(flipped_pipeline), next(plain_pipeline)
  assert flipped_pipeline.last_keys == plain_pipeline.last_keys
  for row, key in enumerate(flipped_pipeline.last_keys):
    labels = reference[key]["labels"]
    seg = np.where(labels.seg == 255, -1, labels.seg.astype(np.int32))
    np.testing.assert_array_equal(flipped["seg"][row], seg[:, ::-1])
    np.testing.assert_array_equal(plain["seg"][row], seg)
    np.testing.assert_array_equal(flipped["depth"][row], labels.depth[:, ::-1])
    expected_normals = labels.normals[:, ::-1] * np.array([-1.0, 1.0, 1.0], np.float32)
    np.testing.assert_allclose(flipped["normals"][row], expected_normals, atol=1e-6)
    np.testing.assert_allclose(flipped["image"][row], plain["image"][row][:, ::-1], atol=1e-5)
    order = np.argsort(-labels.det_scores, kind="stable")
    ymin, xmin, ymax, xmax = labels.det_boxes[order].T
    mirrored = np.stack([ymin, 1 - xmax, ymax, 1 - xmin], axis=1)
    np.testing.assert_allclose(flipped["det_boxes"][row, :2], mirrored, atol=1e-6)
    np.testing.assert_allclose(plain["det_boxes"][row, :2], labels.det_boxes[order], atol=1e-6)


@pytest.fixture(scope="module")
def rectangle_dir(tmp_path_factory):
  """A rectangle drawn in seg (16 px), depth (32 px) and as a det box, on 48x64 images."""
  rng = np.random.default_rng(3)
  seg = np.zeros((16, 16), np.int64)
  seg[4:12, 4:8] = 1
  depth = np.ones((32, 32), np.float32)
  depth[8:24, 8:16] = 2.0
  box = np.array([[0.25, 0.25, 0.75, 0.5]], np.float32)
  items = [(f"r{i}", rng.integers(0, 256, (48, 64, 3)).astype(np.uint8), "rect",
            records.Labels(seg=seg, depth=depth, det_boxes=box, det_classes=np.array([1])))
           for i in range(8)]
  return _write_dataset(tmp_path_factory.mktemp("rect"), [items], ["seg", "depth", "det"])


def test_random_crops_move_seg_depth_and_boxes_together(rectangle_dir):
  pipeline = _pipeline(rectangle_dir, batch=8, tasks=["seg", "depth", "det"], label_size=24,
                       crop_scale=(0.2, 1.0))
  batches, _ = _take(pipeline, 3)
  centres = (np.arange(24) + 0.5) / 24
  checked = 0
  windows = set()
  for batch in batches:
    for row in range(8):
      inside_seg = batch["seg"][row] == 1
      # Both labels sample the same source points; the rectangle edges are at the same place.
      np.testing.assert_array_equal(inside_seg, batch["depth"][row] > 1.5)
      windows.add(inside_seg.tobytes())
      if batch["det_classes"][row, 0] != 1:
        continue
      ymin, xmin, ymax, xmax = batch["det_boxes"][row, 0]
      inside_box = (((centres >= ymin) & (centres < ymax))[:, None]
                    & ((centres >= xmin) & (centres < xmax))[None, :])
      mismatch = np.sum(inside_box != inside_seg)
      assert mismatch <= 24, (row, mismatch)  # at most a row of float-rounding at an edge
      assert inside_seg.sum() > 0
      checked += 1
  assert checked >= 12 and len(windows) >= 12  # kept boxes, and crops really differ


# ---------------------------------------------------------------------------------------------
# Determinism, resume and per-process reading.


def _assert_batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(mixed_dir):
  """Six batches (two epochs of 12 records) of an uninterrupted seed-5 pipeline."""
  return _take(_pipeline(mixed_dir, batch=4, seed=5), 6)


def test_same_seed_same_batches_other_seed_other_batches(mixed_dir, uninterrupted):
  again, again_keys = _take(_pipeline(mixed_dir, batch=4, seed=5), 2)
  _, other_keys = _take(_pipeline(mixed_dir, batch=4, seed=6), 2)
  assert again_keys == uninterrupted[1][:2]
  for a, b in zip(again, uninterrupted[0]):
    _assert_batches_equal(a, b)
  assert other_keys != again_keys


def test_epochs_cover_every_record_once_and_reshuffle(mixed_dir, uninterrupted):
  keys = uninterrupted[1]
  epoch_one = [k for batch in keys[:3] for k in batch]
  epoch_two = [k for batch in keys[3:] for k in batch]
  assert sorted(epoch_one) == sorted(epoch_two) == sorted(_by_key(mixed_dir))
  assert epoch_one != epoch_two


def test_restored_pipeline_yields_the_next_batch_of_an_uninterrupted_one(mixed_dir, uninterrupted):
  batches, keys = uninterrupted
  interrupted = _pipeline(mixed_dir, batch=4, seed=5)
  _take(interrupted, 3)
  state = json.loads(json.dumps(interrupted.get_state()))
  assert state["batches_yielded"] == 3 and state["seed"] == 5
  restored = _pipeline(mixed_dir, batch=4, seed=5)
  restored.set_state(state)
  resumed, resumed_keys = _take(restored, 2)
  assert resumed_keys == keys[3:5]  # batch 4 is already in the second epoch
  _assert_batches_equal(resumed[0], batches[3])
  _assert_batches_equal(resumed[1], batches[4])
  assert restored.get_state()["batches_yielded"] == 5


def test_set_state_rejects_another_seed(mixed_dir):
  with pytest.raises(ValueError, match="seed 1 .* seed 2"):
    _pipeline(mixed_dir, seed=2).set_state(_pipeline(mixed_dir, seed=1).get_state())


@pytest.mark.parametrize("fixture", ["mixed_dir", "square_dir"])  # 3 shards / 1 shard
def test_two_processes_read_disjoint_halves_of_an_epoch(fixture, request):
  directory = request.getfixturevalue(fixture)
  epoch = []
  for index in range(2):
    pipeline = _pipeline(directory, batch=2, index=index, count=2)
    assert pipeline.local_batch_size == 1
    _, keys = _take(pipeline, pipeline.local_records_per_epoch)
    epoch.append([k for batch in keys for k in batch])
  assert not set(epoch[0]) & set(epoch[1])
  assert sorted(epoch[0] + epoch[1]) == sorted(_by_key(directory))
  assert len(set(epoch[0])) == len(epoch[0])


# ---------------------------------------------------------------------------------------------
# Errors a user can act on.


def test_missing_task_names_task_directory_and_found_tasks(rectangle_dir):
  with pytest.raises(ValueError) as error:
    _pipeline(rectangle_dir, tasks=["seg", "normals"])
  message = str(error.value)
  assert "'normals'" in message and rectangle_dir in message and "['depth', 'det', 'seg']" in message


def test_batch_must_divide_by_process_count(mixed_dir):
  with pytest.raises(ValueError, match="global batch size 5 .* process count 2"):
    _pipeline(mixed_dir, batch=5, count=2)


def test_config_dict_and_plain_dict_configure_the_same_pipeline(mixed_dir):
  import ml_collections
  fields = _config(mixed_dir, crop_scale=(0.3, 0.9), max_boxes=4)
  from_dict = loader.InputPipeline(fields, HashTokenizer(), 4, ["det"], 0, 0, 1)
  from_config = loader.InputPipeline(ml_collections.ConfigDict(fields), HashTokenizer(), 4, ["det"],
                                     0, 0, 1)
  assert from_config.options == from_dict.options
  assert from_config.options.crop_scale == (0.3, 0.9) and from_config.options.max_boxes == 4
  assert from_config.shuffle_buffer == 8 and from_config.options.label_size == 8


def test_missing_config_field_is_named(mixed_dir):
  with pytest.raises(ValueError, match="'image_size'"):
    loader.InputPipeline({"directory": mixed_dir}, HashTokenizer(), 4, ["seg"], 0, 0, 1)


def _without_text(key: str) -> bytes:
  import tensorflow as tf
  example = tf.train.Example.FromString(records.make_example(key, b"", "t"))
  del example.features.feature["text"]
  return example.SerializeToString()


@pytest.mark.parametrize("train,broken", [(False, "jpeg"), (True, "jpeg"), (True, "text")])
def test_undecodable_record_names_shard_and_key(tmp_path, train, broken):
  rng = np.random.default_rng(4)
  path = os.path.join(tmp_path, shards.shard_name("train", 0, 1))
  with shards.ShardWriter(path) as writer:
    for i in range(6):
      key = "broken-7" if i == 3 else f"good{i}"
      image = records.encode_jpeg(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8))
      if i == 3 and broken == "jpeg":
        image = b"\xff\xd8 definitely not a jpeg"
      record = _without_text(key) if i == 3 and broken == "text" else records.make_example(
          key, image, "t")
      writer.write(key, record)
  shards.write_manifest(str(tmp_path), {"seg": {}}, [path], "test")
  pipeline = _pipeline(str(tmp_path), batch=2, tasks=["seg"], train=train, image_size=8)
  with pytest.raises(records.RecordError) as error:
    _take(pipeline, 3)
  message = str(error.value)
  assert "train-00000-of-00001.tfrecord" in message and "'broken-7'" in message


# ---------------------------------------------------------------------------------------------
# Global batches.


def test_to_global_batch_shards_the_leading_axis_over_data_and_fsdp(mixed_dir):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
  local = next(_pipeline(mixed_dir, batch=8))
  global_batch = sharding.to_global_batch(local, mesh)
  assert sorted(global_batch) == sorted(local)
  for name, array in global_batch.items():
    assert array.shape == local[name].shape and array.dtype == local[name].dtype
    assert array.sharding.spec == PartitionSpec(("data", "fsdp"))
    assert len(array.addressable_shards) == 8
    for shard in array.addressable_shards:
      assert shard.data.shape[0] == 1
      np.testing.assert_array_equal(np.asarray(shard.data), local[name][shard.index])
    np.testing.assert_array_equal(np.asarray(array), local[name])
