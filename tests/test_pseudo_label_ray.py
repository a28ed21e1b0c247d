"""The Ray runner on a real local Ray cluster (one per module): the same directory as the local
runner (bad samples included), a worker process killed mid-job still gives every key once, reruns
skip complete shards, and a bad --ray_address is a one-line error."""

import functools
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import ray
from ray import cloudpickle

from clipzoo_jax.data import records, shards, toyworld
from clipzoo_jax.experts import base, tiny
from clipzoo_jax.pseudo_label import config as config_lib
from clipzoo_jax.pseudo_label import corpus as corpus_lib
from clipzoo_jax.pseudo_label import job, ray_runner
from tests.helpers import write_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOYWORLD = {"seg": {"kind": "toyworld"}, "depth": {"kind": "toyworld"}}
ONE_CPU = config_lib.RayOptions(num_cpus=1)  # two workers on the two-CPU test cluster
ONE_WORKER = config_lib.RayOptions(num_cpus=1, num_workers=1)  # where one start is enough


@pytest.fixture(scope="module")
def cluster():
  """A two-CPU Ray cluster started by this process; yields its address for other drivers."""
  cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests
  env = {"TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
           object_store_memory=100 * 2**20, runtime_env={"env_vars": env})
  yield ray.get_runtime_context().gcs_address
  ray.shutdown()
  cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def quiet(_):
  pass


def _scenes_tar(path, first, count, bad=False):
  """Toy-world pairs; with `bad`, also an undecodable JPEG, a missing caption, a caption without
  image, a blank caption and a PNG source (re-encoded to JPEG by the job)."""
  scenes = [toyworld.render_scene(2, i, 32) for i in range(first, first + count)]
  members = [m for s in scenes for m in ((s.key + ".jpg", records.encode_jpeg(s.image)),
                                         (s.key + ".txt", s.caption.encode()))]
  if bad:
    png_scene, png = toyworld.render_scene(2, 10_000 + first, 32), io.BytesIO()
    Image.fromarray(png_scene.image).save(png, format="PNG")
    jpeg = members[0][1]
    members += [("broken.jpg", jpeg[:40] + b"garbage" * 10), ("broken.txt", b"c"),
                ("nocaption.jpg", jpeg), ("noimage.txt", b"a caption"),
                ("blank.jpg", jpeg), ("blank.txt", b" "),
                (png_scene.key + ".png", png.getvalue()), (png_scene.key + ".txt", b"a png source")]
    scenes.append(png_scene)
  write_tar(path, members)
  return [s.key for s in scenes]


def _corpus(directory, num_tars, per_tar, bad_tar=None):
  keys = []
  for t in range(num_tars):
    keys += _scenes_tar(os.path.join(directory, f"{t:05d}.tar"), t * per_tar, per_tar, t == bad_tar)
  return corpus_lib.TarCorpus(os.path.join(directory, f"{{00000..{num_tars - 1:05d}}}.tar")), keys


def _without_timings(name, data):
  """A file's content, less what differs between any two runs: report timings, manifest time
  and command line."""
  if name.endswith(".report.json"):
    return dict(json.loads(data), seconds=None)
  if name == shards.MANIFEST_NAME:
    return dict(json.loads(data), created=None, command=None)
  return data


def _assert_same_directory(got, want):
  names = sorted(os.listdir(want))
  assert sorted(os.listdir(got)) == names
  for name in names:
    with open(os.path.join(got, name), "rb") as a, open(os.path.join(want, name), "rb") as b:
      assert _without_timings(name, a.read()) == _without_timings(name, b.read()), name


def _read_keys(directory):
  import tensorflow as tf
  return [records.parse_example(s)["key"] for path in shards.shard_paths(directory)
          for s in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def test_same_directory_as_the_local_runner_with_bad_samples(tmp_path, cluster):
  corpus, keys = _corpus(str(tmp_path), num_tars=3, per_tar=4, bad_tar=1)
  seg = {"kind": "hf_semantic", "source": tiny.save_segformer(str(tmp_path / "segformer")),
         "device": "cpu"}
  configs = {"seg": seg, "depth": {"kind": "toyworld"}}
  options = job.JobOptions(batch_size=3)
  local, distributed = str(tmp_path / "local"), str(tmp_path / "ray")
  job.run_worker(corpus, base.build_experts(configs), local, options, command="same", log=quiet)
  manifest = ray_runner.run(corpus, functools.partial(base.build_experts, configs), distributed,
                            options, ONE_WORKER, command="same", log=quiet)
  assert manifest["counts"] == {"read": 17, "written": 13, "bad": 4}
  _assert_same_directory(distributed, local)
  assert sorted(_read_keys(distributed)) == sorted(keys)
  assert job.verify_job(distributed) == []


class _DiesOnce(base.Expert):
  """The toy-world segmenter, whose forward pass on `key` kills its own worker process once (a
  marker file remembers it), as a crashed GPU driver or an OOM kill would."""
  task, kind, source = "seg", "toyworld", "dies once"

  def __init__(self, key, marker):
    self.key, self.marker = key, marker
    self.inner = base.build_expert("seg", {"kind": "toyworld"})
    self.classes, self.resolution = self.inner.classes, self.inner.resolution

  def manifest_entry(self):
    return self.inner.manifest_entry()

  def run(self, prepared, batch):
    if self.key in batch.keys and not os.path.exists(self.marker):
      open(self.marker, "w").close()
      os._exit(1)
    return self.inner.run(prepared, batch)


def _dying_experts(key, marker):
  return {"seg": _DiesOnce(key, marker), "depth": base.build_expert("depth", {"kind": "toyworld"})}


def test_a_worker_killed_mid_job_is_retried_and_every_key_written_once(tmp_path, cluster):
  corpus, keys = _corpus(str(tmp_path), num_tars=4, per_tar=6)
  options, marker = job.JobOptions(batch_size=2), str(tmp_path / "killed")
  local, distributed = str(tmp_path / "local"), str(tmp_path / "ray")
  job.run_worker(corpus, base.build_experts(TOYWORLD), local, options, log=quiet)
  lines = []
  kill_at = keys[9]  # the second batch of the second shard: a partial shard file is on disk
  ray_runner.run(corpus, functools.partial(_dying_experts, kill_at, marker), distributed, options,
                 ONE_CPU, log=lines.append)
  assert os.path.exists(marker), "the worker must have been killed"
  assert sorted(_read_keys(distributed)) == sorted(keys)  # exactly once
  _assert_same_directory(distributed, local)  # no temporary file of the killed attempt is left
  assert job.verify_job(distributed) == []
  assert any("img/s" in line and "ETA" in line and "shard 4/4" in line for line in lines), lines


def test_an_expert_failing_in_a_worker_stops_the_job_with_the_local_message(tmp_path, cluster):
  jpeg = records.encode_jpeg(toyworld.render_scene(2, 0, 32).image)
  pattern = write_tar(tmp_path / "00000.tar", [("stranger.jpg", jpeg), ("stranger.txt", b"c")])
  with pytest.raises(job.JobError, match=r"expert seg \(toyworld .* in shard train-00000-of-00001"
                     r"\.tfrecord \(keys 'stranger'\): ValueError: key 'stranger' is not a "
                     r"toy-world key.*on_expert_error=skip$"):
    ray_runner.run(corpus_lib.TarCorpus(pattern), functools.partial(base.build_experts, TOYWORLD),
                   str(tmp_path / "out"), ray_options=ONE_WORKER, log=quiet)


def _tool(*args):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  command = [sys.executable, os.path.join(REPO, "tools", "pseudo_label.py"), *args]
  return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_tool_on_a_cluster_address_reruns_only_incomplete_shards(tmp_path, cluster):
  corpus, keys = _corpus(str(tmp_path), num_tars=3, per_tar=3)
  out = str(tmp_path / "out")
  flags = ["--config=configs/pseudo_label/toyworld.py:tasks=seg+depth,batch_size=2",
           f"--corpus=tar:{corpus.pattern}", f"--output_dir={out}", "--runner=ray",
           f"--ray_address={cluster}", "--config.ray.num_workers=1"]
  first = _tool(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "ray: 3 of 3 shards to do" in first.stdout and "img/s" in first.stdout
  names = [shards.shard_name("train", i, 3) for i in range(3)]
  before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in names}
  os.remove(shards.sidecar_path(os.path.join(out, names[1])))  # as if killed before its sidecar
  os.remove(os.path.join(out, shards.MANIFEST_NAME))
  rerun = _tool(*flags)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "ray: 1 of 3 shards to do" in rerun.stdout
  for name in (names[0], names[2]):  # complete shards were skipped, not rewritten
    assert os.stat(os.path.join(out, name)).st_mtime_ns == before[name]
  assert sorted(_read_keys(out)) == sorted(keys) and job.verify_job(out) == []
  local = str(tmp_path / "local")
  job.run_worker(corpus, base.build_experts(TOYWORLD), local, job.JobOptions(batch_size=2),
                 log=quiet)
  for resumed, uninterrupted in zip(shards.read_manifest(out)["shards"],
                                    shards.read_manifest(local)["shards"]):
    assert resumed == uninterrupted


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "--ray_address=127.0.0.1:1: no Ray head reachable there (ConnectionRefusedError"),
    ("nonsense", "--ray_address='nonsense': expected auto, HOST:PORT"),
])
def test_a_bad_ray_address_is_a_one_line_error(tmp_path, address, message):
  _scenes_tar(str(tmp_path / "x.tar"), 0, 1)
  result = _tool("--config=configs/pseudo_label/toyworld.py", f"--corpus=tar:{tmp_path}/x.tar",
                 f"--output_dir={tmp_path}/out", "--runner=ray", f"--ray_address={address}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert message in result.stderr.splitlines()[0], result.stderr  # the error, in one line
