"""The grain input pipeline: batch contract, labels against the NumPy record decoders, global
shuffle over epochs, exact and constant-work resume (in this process and in worker processes),
per-process halves, mixtures, and bad records skipped, counted and bounded."""

import json
import logging
import os

import grain
import numpy as np
import pytest

from clipzoo_jax import cli
from clipzoo_jax.data import grain_loader, pipelines, random_access, records, shards
from clipzoo_jax.data.tokenizer import WordHashTokenizer as HashTokenizer
from test_loader import _mixed_labels, _square_record, _take, _write_dataset

ALL_TASKS = list(records.TASKS)


def _items(seed, count, prefix, hw=(24, 32), label_hw=(12, 16)):
  rng = np.random.default_rng(seed)
  return [(f"{prefix}{i}", rng.integers(0, 256, (*hw, 3)).astype(np.uint8),
           f"caption {prefix} {i}", _mixed_labels(i, rng, label_hw)) for i in range(count)]


@pytest.fixture(scope="module")
def ten_dir(tmp_path_factory):
  """3 shards (4 + 3 + 3 records) of 24x32 images with labels at half resolution."""
  items = _items(0, 10, "r")
  return _write_dataset(tmp_path_factory.mktemp("ten"), [items[:4], items[4:7], items[7:]])


def _config(directory, **overrides):
  config = {"directory": directory, "image_size": 16, "label_size": 8, "num_workers": 0,
            "threads": 2, "loader": "grain"}
  config.update(overrides)
  return config


def _pipeline(directory, batch=4, tasks=ALL_TASKS, seed=0, index=0, count=1, train=True,
              **overrides):
  return pipelines.build(_config(directory, **overrides), HashTokenizer(), batch, tasks,
                         seed=seed, process_index=index, process_count=count, train=train)


def _by_key(directory):
  found = {}
  for path in shards.shard_paths(directory):
    source_path = path
    for offset in np.fromfile(shards.index_path(source_path), "<i8"):
      with open(source_path, "rb") as f:
        f.seek(int(offset))
        length = int(np.frombuffer(f.read(8), "<u8")[0])
        f.read(4)
        parsed = records.parse_example(f.read(length))
      found[parsed["key"]] = parsed
  return found


# ---------------------------------------------------------------------------------------------
# The batch contract and the labels.


def test_batches_follow_the_contract_with_uint8_images(ten_dir):
  pipeline = _pipeline(ten_dir)
  batch = next(pipeline)
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 16, 16, 3)
  assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (4, 6)
  assert batch["seg"].shape == (4, 8, 8) and batch["seg"].dtype == np.int32
  assert batch["depth"].shape == (4, 8, 8) and batch["normals"].shape == (4, 8, 8, 3)
  assert batch["det_boxes"].shape == (4, 16, 4) and batch["det_classes"].dtype == np.int32
  assert {k for k in batch if k.endswith("_mask")} == {f"{t}_mask" for t in ALL_TASKS}
  assert not any(k.startswith("_") or k == "key" for k in batch)
  only_seg = next(_pipeline(ten_dir, tasks=["seg"]))
  assert set(only_seg) == {"image", "tokens", "seg", "seg_mask"}


def test_eval_view_at_full_resolution_matches_the_numpy_record_decoders(tmp_path):
  """Square 16 px records, eval mode, label size = image size: every label comes back exactly
  as `records.parse_example` decodes it (the writer's inverse), the image as stored."""
  rng = np.random.default_rng(1)
  directory = _write_dataset(tmp_path, [[_square_record(f"q{i}", rng) for i in range(5)]])
  pipeline = _pipeline(directory, batch=2, train=False, label_size=16)
  expected = _by_key(directory)
  seen = []
  for batch in pipeline:
    for row, key in enumerate(pipeline.last_keys):
      seen.append(key)
      want = expected[key]
      np.testing.assert_array_equal(batch["image"][row], want["image"])
      seg = want["labels"].seg.astype(np.int32)
      np.testing.assert_array_equal(batch["seg"][row], np.where(seg == 255, -1, seg))
      np.testing.assert_allclose(batch["depth"][row], want["labels"].depth, rtol=1e-6)
      np.testing.assert_allclose(batch["normals"][row], want["labels"].normals, atol=1e-6)
      order = np.argsort(-want["labels"].det_scores, kind="stable")
      np.testing.assert_allclose(batch["det_boxes"][row][:2], want["labels"].det_boxes[order],
                                 atol=1e-6)
      assert list(batch["det_classes"][row][:3]) == [*want["labels"].det_classes[order], -1]
  assert seen == [f"q{i}" for i in range(5)]  # one pass in manifest order, short last batch


def test_forced_flip_mirrors_every_label_and_negates_normal_x(tmp_path):
  rng = np.random.default_rng(2)
  directory = _write_dataset(tmp_path, [[_square_record(f"q{i}", rng) for i in range(4)]])
  common = dict(batch=4, label_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  plain = next(_pipeline(directory, flip_probability=0.0, **common))
  flipped = next(_pipeline(directory, flip_probability=1.0, **common))
  np.testing.assert_array_equal(flipped["image"], plain["image"][:, :, ::-1])
  np.testing.assert_array_equal(flipped["seg"], plain["seg"][:, :, ::-1])
  np.testing.assert_array_equal(flipped["depth"], plain["depth"][:, :, ::-1])
  np.testing.assert_allclose(flipped["normals"],
                             plain["normals"][:, :, ::-1] * np.array([-1, 1, 1]), atol=1e-6)
  boxes, mirrored = plain["det_boxes"][:, :2], flipped["det_boxes"][:, :2]
  np.testing.assert_allclose(mirrored[..., [1, 3]], 1.0 - boxes[..., [3, 1]], atol=1e-6)


def test_a_random_crop_moves_labels_at_lower_resolution_with_the_image(tmp_path):
  """The image and a label stored at a quarter of its resolution encode the same scene (class =
  column band); after random crops the label's bands still sit under the image's bands."""
  def item(i):
    cols = np.arange(64) // 16  # 4 vertical bands
    image = np.repeat((cols * 60)[None, :, None], 48, 0).repeat(3, 2).astype(np.uint8)
    labels = records.Labels(seg=np.repeat((np.arange(16) // 4)[None, :], 12, 0))
    return f"b{i}", image, "bands", labels
  directory = _write_dataset(tmp_path, [[item(i) for i in range(8)]], tasks=["seg"])
  pipeline = _pipeline(directory, batch=8, tasks=["seg"], label_size=16, image_size=16,
                       crop_scale=(0.2, 0.6))
  batch = next(pipeline)
  band_of_pixel = np.rint(batch["image"][..., 0].astype(np.float32) / 60)
  agree = band_of_pixel == batch["seg"]
  assert agree.mean() > 0.9, agree.mean()  # only the bilinear band edges may differ


# ---------------------------------------------------------------------------------------------
# Order, epochs, resume.


def test_each_epoch_covers_every_record_once_and_reshuffles(ten_dir):
  _, keys = _take(_pipeline(ten_dir, batch=5), 6)
  epochs = [sum(keys[2 * e:2 * e + 2], []) for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == [f"r{i}" for i in range(10)]
  assert epochs[0] != epochs[1] != epochs[2]
  _, again = _take(_pipeline(ten_dir, batch=5), 6)
  _, other_seed = _take(_pipeline(ten_dir, batch=5, seed=1), 6)
  assert again == keys and other_seed != keys


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_across_an_epoch_boundary_equals_the_uninterrupted_stream(ten_dir, workers):
  """Stopped after 3 batches of 4 (epoch 1 starts inside batch 3) and restored from the JSON
  checkpoint item: the next batches have the same keys, pixels and labels."""
  uninterrupted = _pipeline(ten_dir, num_workers=workers)
  expected, expected_keys = _take(uninterrupted, 3)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  more, more_keys = _take(uninterrupted, 4)
  expected, expected_keys = expected + more, expected_keys + more_keys
  uninterrupted.close()
  resumed = _pipeline(ten_dir, num_workers=workers)
  resumed.set_state(state)
  got, got_keys = _take(resumed, 4)
  resumed.close()
  assert got_keys == expected_keys[3:]
  for want, have in zip(expected[3:], got):
    assert set(want) == set(have)
    for name in want:
      np.testing.assert_array_equal(want[name], have[name], err_msg=name)


def test_resume_deep_into_a_run_reads_only_the_next_batch(ten_dir, monkeypatch):
  """Constant-time resume: restoring the position after 50 epochs reads no consumed record."""
  long_run = _pipeline(ten_dir, batch=5, threads=1)
  _take(long_run, 100)
  state = json.loads(json.dumps(long_run.get_state()))
  _, expected = _take(long_run, 1)
  long_run.close()
  resumed = _pipeline(ten_dir, batch=5, threads=1)
  resumed.set_state(state)
  reads = []
  original = random_access.ShardRecords.__getitem__
  monkeypatch.setattr(random_access.ShardRecords, "__getitem__",
                      lambda self, i: reads.append(i) or original(self, i))
  _, resumed_keys = _take(resumed, 1)
  assert len(reads) <= 10, len(reads)  # one batch plus the read-ahead, not 505 records
  assert resumed_keys == expected and resumed.counters()["data/epoch"] == 101 * 5 / 10


def test_resume_after_a_layout_change_continues_at_the_first_unread_example(ten_dir, caplog):
  """Saved at global batch 4 on one process after 3 batches (12 examples); resumed on two
  processes at global batch 6: the global stream continues at example 12, same augmentation;
  and an exact resume of the new layout keeps that offset."""
  saved = _pipeline(ten_dir)
  _take(saved, 3)
  state = json.loads(json.dumps(saved.get_state()))
  stream, stream_keys = _take(_pipeline(ten_dir, batch=1), 24)
  resumed = [_pipeline(ten_dir, batch=6, index=i, count=2) for i in range(2)]
  with caplog.at_level(logging.WARNING):
    for pipeline in resumed:
      pipeline.set_state(state)
  assert "Continuing the global stream at example 12" in caplog.text
  first = [_take(pipeline, 1) for pipeline in resumed]
  # each process's state after one batch, as the collective get_state gathers them
  new_state = resumed[0].get_state()
  new_state["processes"] = [p.get_state()["processes"][i] for i, p in enumerate(resumed)]
  new_state = json.loads(json.dumps(new_state))
  second = [_take(pipeline, 1) for pipeline in resumed]
  restored = [_pipeline(ten_dir, batch=6, index=i, count=2) for i in range(2)]
  for pipeline in restored:
    pipeline.set_state(new_state)
  again = [_take(pipeline, 1) for pipeline in restored]
  for index in range(2):
    for step, taken in ((0, first[index]), (1, second[index]), (1, again[index])):
      (batch,), (keys,) = taken
      positions = [12 + 6 * step + 3 * index + i for i in range(3)]
      assert keys == [stream_keys[p][0] for p in positions]
      np.testing.assert_array_equal(batch["image"], np.concatenate(
          [stream[p]["image"] for p in positions]))


def test_resume_refuses_another_dataset_and_another_loader(ten_dir, tmp_path):
  state = _pipeline(ten_dir).get_state()
  other = _write_dataset(tmp_path, [_items(9, 7, "o")])
  with pytest.raises(cli.UserError, match="saved over 10 records per epoch; these sources have 7"):
    _pipeline(other).set_state(state)
  with pytest.raises(cli.UserError, match="another loader"):
    _pipeline(ten_dir).set_state({"version": 1, "seed": 0, "batches_yielded": 3})
  with pytest.raises(cli.UserError, match="'grain' loader"):
    _pipeline(ten_dir, loader="tfdata").set_state(state)


def test_two_processes_read_disjoint_halves_of_every_global_batch(ten_dir):
  halves = [_take(_pipeline(ten_dir, batch=4, index=i, count=2), 5)[1] for i in range(2)]
  single = _take(_pipeline(ten_dir, batch=2), 10)[1]
  stream = sum(single, [])
  first_epoch = sum(halves[0][:2] + halves[1][:2], [])
  assert sorted(first_epoch) == sorted(set(first_epoch)) and len(first_epoch) == 8
  for step in range(5):
    zero, one = halves[0][step], halves[1][step]
    # the global stream, dealt out in blocks: process p takes the p-th half of each global batch,
    # so the halves stacked in process order are the single-process global batch
    assert zero == stream[4 * step:4 * step + 2] and one == stream[4 * step + 2:4 * step + 4]


def test_global_batches_do_not_depend_on_the_process_or_worker_count(ten_dir):
  """Each process's local batches, stacked in process order, are the global batches one process
  with no workers reads (keys, pixels and labels): a run spanning hosts, or with more loader
  workers, trains on the same numbers."""
  reference, reference_keys = _take(_pipeline(ten_dir, batch=4, num_workers=0), 5)
  for count, workers in ((1, 2), (2, 0), (2, 2)):
    pipelines_ = [_pipeline(ten_dir, batch=4, index=i, count=count, num_workers=workers)
                  for i in range(count)]
    taken = [_take(pipeline, 5) for pipeline in pipelines_]
    for pipeline in pipelines_:
      pipeline.close()
    for step in range(5):
      keys = sum((keys[step] for _, keys in taken), [])
      assert keys == reference_keys[step], (count, workers, step)
      for name, want in reference[step].items():
        np.testing.assert_array_equal(np.concatenate([batches[step][name] for batches, _ in taken]),
                                      want, err_msg=f"{name} ({count} processes, {workers} workers)")


def test_process_blocks_cover_a_finite_stream_once_whatever_the_process_count():
  """The evaluation stream (finite, last global batch partial): every position exactly once,
  each process's positions in order, blocks of the local batch."""
  for length, start, local, count in ((10, 0, 2, 2), (11, 3, 2, 3), (7, 0, 4, 2), (1, 0, 3, 4)):
    parent = grain.MapDataset.range(length)
    shares = [list(grain_loader.ProcessBlocks(parent, start, local, index, count))
              for index in range(count)]
    assert sorted(sum(shares, [])) == list(range(start, length)), (length, start, local, count)
    for share in shares:
      assert share == sorted(share)
    assert shares[0][:local] == list(range(start, min(start + local, length)))


def test_a_mixture_samples_sources_by_weight_and_masks_their_missing_tasks(tmp_path):
  big = _write_dataset(tmp_path / "a", [_items(3, 12, "a")], tasks=ALL_TASKS)
  seg_only = [(k, im, t, records.Labels(seg=np.zeros((12, 16), np.int32)))
              for k, im, t, _ in _items(4, 12, "b")]
  small = _write_dataset(tmp_path / "b", [seg_only], tasks=["seg"])
  config = _config(None, sources={"a": {"directory": big, "weight": 3.0},
                                  "b": {"directory": small, "weight": 1.0}})
  pipeline = pipelines.build(config, HashTokenizer(), 8, ALL_TASKS)
  from_b, depth_masks = 0, []
  for _ in range(25):
    batch = next(pipeline)
    is_b = np.array([key.startswith("b") for key in pipeline.last_keys])
    from_b += is_b.sum()
    assert (batch["seg_mask"][is_b] == 1).all() and (batch["depth_mask"][is_b] == 0).all()
    assert (batch["normals_mask"][is_b] == 0).all() and (batch["det_mask"][is_b] == 0).all()
    depth_masks.extend(batch["depth_mask"][~is_b])
  assert 0.15 < from_b / 200 < 0.35, from_b  # weight 1 of 4
  assert 0 < np.mean(depth_masks) < 1  # source a's own per-record presence still shows


# ---------------------------------------------------------------------------------------------
# Bad records.


def _bad_dataset(tmp_path, case):
  """Two shards of 8 records; record 'x11' (the second shard's fourth) is broken in the way `case` says."""
  items = _items(5, 16, "x")
  directory = str(tmp_path / case)
  os.makedirs(directory)
  paths = []
  for number, part in enumerate((items[:8], items[8:])):
    path = os.path.join(directory, shards.shard_name("train", number, 2))
    with shards.ShardWriter(path) as writer:
      for key, image, text, labels in part:
        jpeg = records.encode_jpeg(image)
        if key == "x11" and case == "undecodable_image":
          jpeg = jpeg[:40] + b"\x00" * 20
        if key == "x11" and case == "wrong_size_label":
          labels = records.Labels(seg=np.zeros((12, 40), np.int32))
        serialized = records.make_example(key, jpeg, text, labels)
        if key == "x11" and case == "missing_field":
          from clipzoo_jax.data import example_proto
          example = example_proto.Example.FromString(serialized)
          del example.features.feature["text"]
          serialized = example.SerializeToString()
        writer.write(key, serialized)
    paths.append(path)
  shards.write_manifest(directory, {t: {"expert": {"name": "test"}} for t in ALL_TASKS}, paths,
                        "test")
  if case == "truncated_shard":
    with open(paths[0], "r+b") as f:
      f.truncate(os.path.getsize(paths[0]) - 300)  # cuts into the first shard's last record
  return directory


@pytest.mark.parametrize("case,bad_key", [("undecodable_image", "x11"),
                                          ("wrong_size_label", "x11"),
                                          ("missing_field", "x11"),
                                          ("truncated_shard", "<record 7 of the shard>")])
def test_a_bad_record_is_skipped_counted_and_named(tmp_path, caplog, case, bad_key):
  directory = _bad_dataset(tmp_path, case)
  pipeline = _pipeline(directory, batch=5, train=False, max_bad_fraction=0.1)
  keys = []
  with caplog.at_level(logging.WARNING):
    for _ in pipeline:
      keys.extend(pipeline.last_keys)
  good = [f"x{i}" for i in range(16) if f"x{i}" != ("x7" if case == "truncated_shard" else "x11")]
  assert keys == good  # every good record exactly once, in order
  assert pipeline.counters()["data/skipped"] == 1
  message = "\n".join(r.getMessage() for r in caplog.records)
  shard = "train-0000%d-of-00002.tfrecord" % (0 if case == "truncated_shard" else 1)
  assert shard in message and repr(bad_key) in message, message


def test_too_many_bad_records_stop_the_run_naming_shard_and_key(tmp_path):
  directory = _bad_dataset(tmp_path, "undecodable_image")
  pipeline = _pipeline(directory, batch=4, train=False, max_bad_fraction=0.0)
  with pytest.raises(records.RecordError, match=r"max_bad_fraction=0.0.*"
                     r"train-00001-of-00002.tfrecord: record 'x11'"):
    for _ in pipeline:
      pass


def test_an_index_that_disagrees_with_the_manifest_is_an_error_naming_the_file(ten_dir, tmp_path):
  import shutil
  directory = str(tmp_path / "copy")
  shutil.copytree(ten_dir, directory)
  index = shards.index_path(shards.shard_paths(directory)[1])
  np.fromfile(index, "<i8")[:-1].tofile(index)
  with pytest.raises(cli.UserError, match=r"train-00001-of-00003.tfrecord.index: 2 record "
                     r"offsets, but the manifest says the shard has 3"):
    _pipeline(directory)
  os.remove(index)  # without an index the shard is scanned
  assert len(_take(_pipeline(directory, batch=5), 2)[1][1]) == 5


# ---------------------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize("overrides,message", [
    (dict(loader="arrayrecord"), "config.data.loader: expected one of"),
    (dict(num_workers=-1), "config.data.num_workers: expected >= 0"),
    (dict(sources={"a": {"weight": 1.0}}), "config.data.sources.a: 'directory' is required"),
    (dict(sources={"a": {"directory": "x", "weight": 0}}), "sources.a.weight: expected > 0"),
])
def test_bad_data_config_is_named(ten_dir, overrides, message):
  with pytest.raises(cli.UserError, match=message):
    _pipeline(ten_dir, **overrides)


def test_colour_jitter_changes_only_the_image(ten_dir):
  plain = next(_pipeline(ten_dir))
  jittered = next(_pipeline(ten_dir, color_jitter=0.4))
  assert not np.array_equal(plain["image"], jittered["image"])
  for name in plain:
    if name != "image":
      np.testing.assert_array_equal(plain[name], jittered[name], err_msg=name)


def test_concurrent_reader_threads_get_intact_records(ten_dir):
  """grain reads with several threads; they share the source's open shards."""
  from concurrent.futures import ThreadPoolExecutor
  source = random_access.ShardRecords(ten_dir)
  expected = [random_access.ShardRecords(ten_dir)[i] for i in range(len(source))]
  order = np.random.default_rng(0).integers(0, len(source), 2000)
  with ThreadPoolExecutor(8) as pool:
    got = list(pool.map(source.__getitem__, order))
  assert all(got[n] == expected[i] for n, i in enumerate(order))
