"""Runs whose workdir, data and tokenizer live in a bucket (`gs://`), against a Google Cloud
Storage emulator on this machine (`gcs_bucket` in conftest.py): gcsfs, google-cloud-storage and
TensorStore speak GCS's JSON API to it over HTTP, as they would to the real service. The loader
reads the same records from a bucket as from disk, checkpoints restore (and a damaged one is set
aside) in a bucket, metrics keep one row per step across a resume, a training run in a bucket
matches the same run on local disk, and mistakes are one line naming the path."""

import os
import signal
import subprocess
import sys
import time

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipzoo_jax import checkpoint, cli, metrics, storage, train
from clipzoo_jax.data import pipelines, random_access, shards, toyworld
from clipzoo_jax.data.tokenizer import WordHashTokenizer
from tests import helpers
from tests.test_train_e2e import RESUME_CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  """The training tool's environment: 8 CPU devices, and the emulator's address (inherited)."""
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2")
  return env


def _download(url, local_dir):
  """Every object under `url` copied to `local_dir` (to read it with local tools)."""
  filesystem, name = fsspec.core.url_to_fs(url)
  for found in filesystem.find(name):
    target = os.path.join(local_dir, os.path.relpath(found, name))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
      f.write(filesystem.cat_file(found))
  return local_dir


# ---------------------------------------------------------------------------------------------
# The storage layer and the loader.


def test_files_in_a_bucket_read_write_move_and_range_read(gcs_bucket, tmp_path):
  path = storage.join(gcs_bucket, "run", "a", "notes.txt")
  storage.write_text(path, "hello bucket")
  assert storage.exists(path) and storage.isdir(storage.join(gcs_bucket, "run", "a"))
  assert storage.read_text(path) == "hello bucket"
  assert storage.glob(storage.join(gcs_bucket, "run", "a", "*.txt")) == [path]
  reader = storage.RangeReader(path)
  assert reader.read(6, 3) == b"buc" and reader.read(6, 100) == b"bucket"
  assert reader.read(50, 4) == b""  # past the end: a short read, as os.pread gives
  storage.move_tree(storage.join(gcs_bucket, "run", "a"), storage.join(gcs_bucket, "run", "b"))
  assert not storage.exists(path)
  assert storage.read_text(storage.join(gcs_bucket, "run", "b", "notes.txt")) == "hello bucket"
  (tmp_path / "d" / "e").mkdir(parents=True)
  (tmp_path / "d" / "manifest.json").write_text("{}")
  (tmp_path / "d" / "e" / "x.bin").write_bytes(b"\x00\x01")
  storage.upload_tree(str(tmp_path / "d"), storage.join(gcs_bucket, "up"), last=["manifest.json"])
  assert storage.read_bytes(storage.join(gcs_bucket, "up", "e", "x.bin")) == b"\x00\x01"
  assert storage.exists(storage.join(gcs_bucket, "up", "manifest.json"))


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("toy") / "toyworld")
  toyworld.write_dataset(directory, num_examples=24, seed=3, size=32, num_shards=3, verbose=False)
  return directory


def _pipeline(directory, **overrides):
  config = {"directory": directory, "image_size": 16, "label_size": 8, "num_workers": 0,
            "threads": 2, "loader": "grain", **overrides}
  return pipelines.build(config, WordHashTokenizer(), 4, ["seg", "depth"], seed=5)


def test_the_grain_loader_reads_the_same_records_from_a_bucket_as_from_disk(toy_dir, gcs_bucket):
  """Keys and pixels, through a worker process (which imports no TensorFlow) reading the
  bucket; and a truncated shard in the bucket is a counted bad record, as on disk."""
  remote = storage.join(gcs_bucket, "data", "toyworld")
  storage.upload_tree(toy_dir, remote, last=[shards.MANIFEST_NAME])
  records = random_access.ShardRecords(remote)
  local_records = random_access.ShardRecords(toy_dir)
  assert [records[i] for i in range(len(records))] == [
      local_records[i] for i in range(len(local_records))]

  local, bucket = _pipeline(toy_dir), _pipeline(remote, num_workers=1)
  try:
    for _ in range(3):
      expected, found = next(local), next(bucket)
      assert bucket.last_keys == local.last_keys
      for name in ("image", "tokens", "seg", "depth"):
        np.testing.assert_array_equal(found[name], expected[name], err_msg=name)
  finally:
    local.close()
    bucket.close()

  first_shard, last_shard = shards.shard_paths(remote)[0], shards.shard_paths(remote)[-1]
  storage.remove(shards.index_path(first_shard))  # a shard without an index is scanned
  np.testing.assert_array_equal(random_access.read_offsets(first_shard, 8),
                                random_access.read_offsets(shards.shard_paths(toy_dir)[0], 8))
  storage.write_bytes(last_shard, storage.read_bytes(last_shard)[:-40])
  truncated = random_access.ShardRecords(remote)
  bad = truncated[len(truncated) - 1]
  assert isinstance(bad, random_access.BadRecord) and "truncated" in bad.reason
  assert bad.shard == last_shard


# ---------------------------------------------------------------------------------------------
# Checkpoints and metrics in a bucket.


def _state(scale):
  return {"step": jnp.int32(scale), "params": {"w": jnp.arange(12.0).reshape(3, 4) * scale}}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_checkpoints_in_a_bucket_restore_and_a_damaged_one_is_set_aside(gcs_bucket):
  workdir = storage.join(gcs_bucket, "run")
  checkpointer = checkpoint.Checkpointer(workdir, keep=3)
  for step in (1, 2):
    checkpointer.save(step, _state(step), {"position": step})
  checkpointer.wait()
  checkpointer.close()
  step_dir = storage.join(checkpoint.checkpoint_dir(workdir), "2")
  assert storage.exists(storage.join(step_dir, "commit_success.txt"))  # Orbax's GCS commit

  # one flipped bit in the largest array file: it still restores, to other numbers
  filesystem, name = fsspec.core.url_to_fs(step_dir)
  sizes = filesystem.find(storage.join(name, "state"), detail=True)
  largest = filesystem.unstrip_protocol(max(sizes, key=lambda p: sizes[p]["size"]))
  data = bytearray(storage.read_bytes(largest))
  data[len(data) // 2] ^= 0x10
  storage.write_bytes(largest, bytes(data))
  checkpointer = checkpoint.Checkpointer(workdir, keep=3)
  state, data_state, step = checkpointer.restore_latest(_abstract(_state(1)))
  checkpointer.close()
  assert step == 1 and data_state == {"position": 1}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.arange(12.0).reshape(3, 4))
  assert not storage.exists(step_dir)
  set_aside = storage.glob(storage.join(workdir, "checkpoints_damaged", "2-*"))
  assert len(set_aside) == 1 and storage.exists(storage.join(set_aside[0], "_CHECKPOINT_METADATA"))


def test_metrics_in_a_bucket_keep_one_row_per_step_across_a_resume(gcs_bucket, tmp_path):
  workdir = storage.join(gcs_bucket, "run")
  writer = metrics.MetricsWriter(workdir)
  for step in range(1, 7):
    writer.write(step, {"loss": 10.0 - step})
    writer.flush()
  writer.close()
  # resumed from the step-4 checkpoint: steps 5 and 6 run again, with other values
  writer = metrics.MetricsWriter(workdir, resume_step=4)
  assert [row["step"] for row in metrics.read_rows(workdir)] == [1, 2, 3, 4]
  for step in range(5, 9):
    writer.write(step, {"loss": 100.0 + step})
    writer.flush()
  writer.write(3, {"eval/top1": 0.5})  # an evaluator adding to an earlier row
  writer.close()
  rows = metrics.read_rows(workdir)
  assert [row["step"] for row in rows] == list(range(1, 9))
  assert [row["loss"] for row in rows] == [9.0, 8.0, 7.0, 6.0, 105.0, 106.0, 107.0, 108.0]
  assert rows[2]["eval/top1"] == 0.5
  local = _download(workdir, str(tmp_path / "run"))
  assert helpers.metrics_file_rows(local) == rows  # one line per step, nothing appended twice
  helpers.assert_tensorboard_matches_file(local)


# ---------------------------------------------------------------------------------------------
# Mistakes: one line naming the path.


def _one_line(error_info):
  message = str(error_info.value)
  assert "\n" not in message, message
  return message


def test_bucket_mistakes_are_one_line_naming_the_path(gcs_bucket):
  config = helpers.tiny_config(tasks=("seg",))
  with pytest.raises(cli.UserError) as error:
    train.check_paths(config, "gs://no-such-bucket/run1")
  assert _one_line(error) == ("--workdir: gs://no-such-bucket/run1: the bucket gs://no-such-bucket "
                              "does not exist")
  config.data.directory = "gs://no-such-bucket/cc3m"
  with pytest.raises(cli.UserError, match=r"^config.data.directory: gs://no-such-bucket/cc3m: "
                     r"the bucket gs://no-such-bucket does not exist$"):
    train.check_paths(config, storage.join(gcs_bucket, "run1"))
  config.data.directory = "gz://typo/cc3m"
  with pytest.raises(cli.UserError) as error:
    train.check_paths(config, storage.join(gcs_bucket, "run1"))
  assert _one_line(error).startswith("config.data.directory: gz://typo/cc3m: not a path this "
                                     "machine can read")
  config.data.directory = storage.join(gcs_bucket, "cc3m")
  config.tokenizer.directory = "gs://no-such-bucket/clip"
  with pytest.raises(cli.UserError, match=r"^config.tokenizer.directory: gs://no-such-bucket"):
    train.check_paths(config, storage.join(gcs_bucket, "run1"))
  config.tokenizer.directory = "tokenizer"
  config.model_init = storage.join(gcs_bucket, "clip-vit-base-patch16")
  with pytest.raises(cli.UserError, match=r"^config.model_init: gs://.* is a URL; a pre-trained"):
    train.check_paths(config, storage.join(gcs_bucket, "run1"))

  # a dataset directory without its manifest, in a bucket that exists and in one that does not
  with pytest.raises(shards.ManifestError) as error:
    shards.read_manifest(storage.join(gcs_bucket, "cc3m"))
  assert _one_line(error).startswith(f"{gcs_bucket}/cc3m/manifest.json: no manifest; ")
  with pytest.raises(shards.ManifestError) as error:
    shards.read_manifest("gs://no-such-bucket/cc3m")
  assert _one_line(error).startswith("gs://no-such-bucket/cc3m/manifest.json: the bucket "
                                     "gs://no-such-bucket does not exist; ")
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.Checkpointer("gs://no-such-bucket/run1")
  assert _one_line(error).startswith("gs://no-such-bucket/run1/checkpoints: checkpoints cannot be "
                                     "written there (the bucket gs://no-such-bucket does not "
                                     "exist)")


@pytest.mark.slow
def test_the_training_tool_refuses_a_missing_bucket_in_one_line(gcs_emulator, tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "train.py"),
       "--workdir=gs://no-such-bucket/run1",
       f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:runlocal,evals=none"],
      env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.splitlines()[-2:] == [
      "error: --workdir: gs://no-such-bucket/run1: the bucket gs://no-such-bucket does not exist",
      "(run with --debug for the traceback)"]
  assert not os.listdir(tmp_path)  # nothing written locally (no directory named "gs:")


# ---------------------------------------------------------------------------------------------
# Training end to end.


def _command(workdir, *flags):
  return [sys.executable, os.path.join(ROOT, "tools", "train.py"),
          f"--config={RESUME_CONFIG}", f"--workdir={workdir}",
          "--config.data.toyworld.num_examples=128", "--config.total_steps=20",
          "--config.log_every=1", "--config.checkpoint_every=1000", *flags]


def _train(workdir, *flags):
  result = subprocess.run(_command(workdir, *flags), env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def _preempt(workdir, after_rows):
  """Starts a run and sends SIGTERM to its process group (as a spot TPU's shutdown does) once
  the bucket's metrics.jsonl has `after_rows` rows; returns its output."""
  process = subprocess.Popen(_command(workdir), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if len(metrics.read_rows(workdir)) >= after_rows:
      break
    time.sleep(0.1)
  os.killpg(process.pid, signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output[-3000:]
  return output


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_after_preemption_with_the_losses_of_a_local_run(
    gcs_bucket, tmp_path):
  """Workdir and data in the bucket (the toy world generated here and uploaded, the tokenizer
  trained on it and written there): preempted, rerun, it has one metrics row per step and the
  losses of the same uninterrupted run on local disk; TensorBoard, the plot and the config are in
  the bucket too."""
  workdir = storage.join(gcs_bucket, "run1")
  _preempt(workdir, after_rows=3)
  saved = sorted(int(storage.basename(p)) for p in storage.glob(
      storage.join(workdir, "checkpoints", "*")) if storage.basename(p).isdigit())
  assert saved and 3 <= saved[-1] < 20, f"SIGTERM should stop the run early; it saved {saved}"
  out = _train(workdir)
  assert "resumed from step" in out and "loss curves: gs://" in out

  local = str(tmp_path / "local")
  _train(local)
  found = _download(workdir, str(tmp_path / "from_bucket"))
  assert [row["step"] for row in helpers.metrics_file_rows(found)] == list(range(1, 21))
  expected = {row["step"]: row["loss"] for row in helpers.metrics_file_rows(local)}
  for row in helpers.metrics_file_rows(found):
    assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-5), row["step"]
  helpers.assert_tensorboard_matches_file(found)
  for name in ("config.json", "loss.png", "data/toyworld/manifest.json", "tokenizer/vocab.json"):
    assert os.path.getsize(os.path.join(found, name)) > 0, name
  assert shards.read_manifest(os.path.join(found, "data", "toyworld"))["num_records"] == 128
