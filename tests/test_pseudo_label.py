"""The pseudo-labelling job end to end: shards decode to the labels of direct model calls, a
SIGKILLed run resumes to exactly-once keys, bad inputs are reported by key, workers split shards."""

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import pytest
from PIL import Image

from clipzoo_jax.data import records, shards, toyworld
from clipzoo_jax.experts import base, tiny
from clipzoo_jax.pseudo_label import corpus as corpus_lib
from clipzoo_jax.pseudo_label import config as config_lib
from clipzoo_jax.pseudo_label import job, report
from tests.helpers import write_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message=".*requires torchvision.*")


def toyworld_tars(directory, num_tars, per_tar, size=32):
  """Toy-world scenes as webdataset tars (the raw corpus); returns (pattern, keys in order)."""
  keys = []
  for t in range(num_tars):
    members = []
    for i in range(t * per_tar, (t + 1) * per_tar):
      scene = toyworld.render_scene(0, i, size)
      members += [(scene.key + ".jpg", records.encode_jpeg(scene.image)),
                  (scene.key + ".txt", scene.caption.encode())]
      keys.append(scene.key)
    write_tar(os.path.join(directory, f"{t:05d}.tar"), members)
  return os.path.join(directory, f"{{00000..{num_tars - 1:05d}}}.tar"), keys


def read_records(directory):
  import tensorflow as tf
  out = []
  for path in shards.shard_paths(directory):
    out += [records.parse_example(s) for s in tf.data.TFRecordDataset(path).as_numpy_iterator()]
  return out


def quiet(_):
  pass


# ---------------------------------------------------------------------------------------------
# Labels equal direct calls of the same models


def _within_quantization(stored, want, step):
  """16-bit PNG depth: rounding to the nearest step (plus float32 decoding, < 1% of a step);
  a positive value below one step is kept valid as one step."""
  tolerance = np.where(want < step, step, 0.5 * step) + 0.01 * step
  return bool(np.all(np.abs(stored - want) <= tolerance))




@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  root = tmp_path_factory.mktemp("zoo")
  return {"seg": tiny.save_segformer(str(root / "segformer")),
          "depth": tiny.save_dpt(str(root / "dpt")),
          "det": tiny.save_rtdetr(str(root / "rtdetr"))}


def _zoo_experts(zoo):
  return base.build_experts({
      "seg": {"kind": "hf_semantic", "source": zoo["seg"], "device": "cpu"},
      "depth": {"kind": "hf_depth", "source": zoo["depth"], "device": "cpu", "label_scale": 0.5},
      "normals": {"kind": "depth_normals", "from_task": "depth"},
      "det": {"kind": "hf_detection", "source": zoo["det"], "device": "cpu", "threshold": 0.1},
  })


def _direct(source, auto, images, post, _loaded={}):
  """The reference: the HF processor and model called directly on a batch."""
  import torch
  from transformers import AutoImageProcessor
  if source not in _loaded:
    _loaded[source] = AutoImageProcessor.from_pretrained(source), auto.from_pretrained(source).eval()
  processor, model = _loaded[source]
  with torch.no_grad():
    outputs = model(**processor(images=images, return_tensors="pt"))
  return post(processor, outputs)


@pytest.mark.slow
def test_shards_hold_the_labels_of_direct_model_calls(tmp_path, zoo):
  from transformers import (AutoModelForDepthEstimation, AutoModelForObjectDetection,
                            AutoModelForSemanticSegmentation)
  images = tiny.random_images(5, [(48, 64)] * 10)
  jpegs = [records.encode_jpeg(image, quality=90) for image in images]
  keys = [f"img{i:03d}" for i in range(10)]
  members = [m for k, j, i in zip(keys, jpegs, range(10))
             for m in ((k + ".jpg", j), (k + ".txt", f"caption {i}".encode()))]
  pattern = write_tar(tmp_path / "00000.tar", members)
  out = str(tmp_path / "out")
  manifest = job.run_worker(corpus_lib.TarCorpus(pattern), _zoo_experts(zoo), out,
                            job.JobOptions(batch_size=4, decode_threads=2), log=quiet)
  assert manifest["num_records"] == 10 and job.verify_job(out) == []
  tasks = manifest["tasks"]
  assert tasks["depth"]["depth_kind"] == "inverse"
  assert tasks["seg"]["classes"] == [f"class_{i}" for i in range(5)]
  assert len(tasks["det"]["expert"]["weights_sha256"]) == 64
  assert tasks["normals"]["depth_expert"]["source"] == zoo["depth"]
  got = {r["key"]: r for r in read_records(out)}
  assert list(got) == keys

  for start in range(0, 10, 4):  # the job's batches; same batch composition as the reference
    chunk = keys[start:start + 4]
    decoded = [np.asarray(Image.open(io.BytesIO(jpegs[keys.index(k)])).convert("RGB")) for k in chunk]
    seg = _direct(zoo["seg"], AutoModelForSemanticSegmentation, decoded,
                  lambda p, o: p.post_process_semantic_segmentation(
                      o, target_sizes=[(48, 64)] * len(chunk)))
    depth = _direct(zoo["depth"], AutoModelForDepthEstimation, decoded,
                    lambda p, o: p.post_process_depth_estimation(o, target_sizes=[(24, 32)] * len(chunk)))
    det = _direct(zoo["det"], AutoModelForObjectDetection, decoded,
                  lambda p, o: p.post_process_object_detection(o, threshold=0.1,
                                                               target_sizes=[(48, 64)] * len(chunk)))
    for j, key in enumerate(chunk):
      record = got[key]
      assert record["text"] == f"caption {keys.index(key)}"
      np.testing.assert_array_equal(record["labels"].seg, seg[j].numpy())
      want = np.maximum(depth[j]["predicted_depth"].numpy(), 0)  # <= 0 is stored as invalid
      assert _within_quantization(record["labels"].depth, want, record["depth_scale"])
      normals = record["labels"].normals
      assert normals.shape == (48, 64, 3)
      assert np.allclose(np.linalg.norm(normals[normals.any(-1)], axis=-1), 1.0, atol=0.01)
      x0, y0, x1, y1 = det[j]["boxes"].numpy().T
      order = np.argsort(-det[j]["scores"].numpy(), kind="stable")
      boxes = np.stack([y0 / 48, x0 / 64, y1 / 48, x1 / 64], 1)[order]
      np.testing.assert_allclose(record["labels"].det_boxes, np.clip(boxes, 0, 1), atol=1e-6)
      np.testing.assert_array_equal(record["labels"].det_classes, det[j]["labels"].numpy()[order])
  # The source JPEG is stored byte for byte.
  import tensorflow as tf
  first = next(tf.data.TFRecordDataset(shards.shard_paths(out)).as_numpy_iterator())
  feature = tf.train.Example.FromString(first).features.feature
  assert feature["image/encoded"].bytes_list.value[0] == jpegs[0]


def _tar_of(path, images):
  jpegs = [records.encode_jpeg(image, quality=90) for image in images]
  write_tar(path, [m for i, jpeg in enumerate(jpegs)
                   for m in ((f"{i:03d}.jpg", jpeg), (f"{i:03d}.txt", b"a caption"))])
  return str(path), jpegs


def _reference_labels(name, processor, outputs, sizes):
  """What a user calling the model directly gets, as Labels (boxes normalized like the schema)."""
  if name in ("upernet", "mask2former", "oneformer"):
    return [records.Labels(seg=m.numpy())
            for m in processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)]
  if name in ("depth_anything", "zoedepth"):
    extra = {"source_sizes": sizes} if name == "zoedepth" else {}
    return [records.Labels(depth=r["predicted_depth"].numpy())
            for r in processor.post_process_depth_estimation(outputs, target_sizes=sizes, **extra)]
  labels = []
  if name == "detr":
    for r, (h, w) in zip(processor.post_process_object_detection(outputs, threshold=0.0,
                                                                 target_sizes=sizes), sizes):
      x0, y0, x1, y1 = r["boxes"].numpy().T
      labels.append(records.Labels(det_boxes=np.clip(np.stack([y0 / h, x0 / w, y1 / h, x1 / w], 1), 0, 1),
                                   det_classes=r["labels"].numpy(), det_scores=r["scores"].numpy()))
    return labels
  for r in processor.post_process_instance_segmentation(outputs, threshold=0.0, target_sizes=sizes):
    segmentation, boxes, classes = r["segmentation"].numpy(), [], []
    for info in r["segments_info"]:
      rows, cols = np.nonzero(segmentation == info["id"])
      if rows.size:
        h, w = segmentation.shape
        boxes.append([rows.min() / h, cols.min() / w, (rows.max() + 1) / h, (cols.max() + 1) / w])
        classes.append(info["label_id"])
    labels.append(records.Labels(det_boxes=np.asarray(boxes).reshape(-1, 4), det_classes=np.asarray(classes)))
  return labels


ADAPTERS = {  # model -> (task, expert kind, Auto class name, extra expert config)
    "upernet": ("seg", "hf_semantic", "AutoModelForSemanticSegmentation", {}),
    "mask2former": ("seg", "hf_semantic", "AutoModelForUniversalSegmentation", {}),
    "oneformer": ("seg", "hf_semantic", "AutoModelForUniversalSegmentation", {}),
    "depth_anything": ("depth", "hf_depth", "AutoModelForDepthEstimation", {}),
    "zoedepth": ("depth", "hf_depth", "AutoModelForDepthEstimation", {}),
    "detr": ("det", "hf_detection", "AutoModelForObjectDetection",
             {"threshold": 0.0, "max_detections": None}),
    "mask2former_instance": ("det", "hf_instance", "AutoModelForUniversalSegmentation",
                             {"threshold": 0.0, "max_detections": None}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_each_adapter_through_the_job_equals_direct_calls(tmp_path, monkeypatch, name):
  import torch
  import transformers
  task, kind, auto_name, extra = ADAPTERS[name]
  builder = "mask2former" if name == "mask2former_instance" else name
  source = getattr(tiny, f"save_{builder}")(str(tmp_path / name))
  pattern, jpegs = _tar_of(tmp_path / "00000.tar", tiny.random_images(7, [(40, 56)] * 6))
  experts = base.build_experts({task: dict(kind=kind, source=source, device="cpu", **extra)})
  out = str(tmp_path / "out")
  job.run_worker(corpus_lib.TarCorpus(pattern), experts, out, job.JobOptions(batch_size=4), log=quiet)
  got = read_records(out)
  if name == "zoedepth":  # transformers 5.23's PIL processor calls torchvision there
    import transformers.models.zoedepth.image_processing_pil_zoedepth as zoe
    resize = lambda t, size, interpolation, antialias: torch.nn.functional.interpolate(
        t[None], size=size, mode="bicubic", align_corners=False)[0]
    monkeypatch.setattr(zoe, "tvF", types.SimpleNamespace(
        resize=resize, InterpolationMode=types.SimpleNamespace(BICUBIC="bicubic")), raising=False)
  processor = transformers.AutoProcessor.from_pretrained(source)
  model = getattr(transformers, auto_name).from_pretrained(source).eval()
  call = {"task_inputs": ["semantic"] * 4} if name == "oneformer" else {}
  for start in (0, 4):  # the job's batches
    images = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs[start:start + 4]]
    with torch.no_grad():
      outputs = model(**processor(images=images, return_tensors="pt",
                                  **{k: v[:len(images)] for k, v in call.items()}))
    for record, want in zip(got[start:start + 4], _reference_labels(name, processor, outputs,
                                                                     [(40, 56)] * len(images))):
      labels = record["labels"]
      if task == "seg":
        np.testing.assert_array_equal(labels.seg, want.seg)
      elif task == "depth":
        assert _within_quantization(labels.depth, np.maximum(want.depth, 0), record["depth_scale"])
      else:
        order = lambda b, c: np.lexsort((b[:, 0], b[:, 1], b[:, 2], c))
        mine, ref = order(labels.det_boxes, labels.det_classes), order(want.det_boxes, want.det_classes)
        np.testing.assert_allclose(labels.det_boxes[mine], want.det_boxes[ref], atol=1e-6)
        np.testing.assert_array_equal(labels.det_classes[mine], want.det_classes[ref])
        assert len(ref) > 0


def _load_config(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", "pseudo_label",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.slow
def test_zoo_config_runs_the_production_experts_from_a_models_dir(tmp_path, zoo):
  models = tmp_path / "models"
  for task, hub_id in (("seg", "nvidia/segformer-b5-finetuned-ade-640-640"),
                       ("depth", "Intel/dpt-large"), ("det", "PekingU/rtdetr_r50vd")):
    (models / hub_id).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(zoo[task], models / hub_id)  # a local copy of the hub folder
  config = _load_config("zoo", f"models_dir={models},device=cpu,batch_size=4,label_scale=0.5")
  experts = config_lib.make_experts(config)
  assert list(experts)[-1] == "normals" and experts["normals"].needs == ("depth",)
  images = tiny.random_images(2, [(40, 48)] * 5)
  pattern = write_tar(tmp_path / "00000.tar", [
      m for i, image in enumerate(images)
      for m in ((f"{i}.jpg", records.encode_jpeg(image)), (f"{i}.txt", b"a caption"))])
  out = str(tmp_path / "out")
  manifest = job.run_worker(config_lib.make_corpus(config, f"tar:{pattern}"), experts, out,
                            config_lib.job_options(config), log=quiet)
  segformer = str(models / "nvidia/segformer-b5-finetuned-ade-640-640")
  assert manifest["tasks"]["seg"]["expert"]["source"] == segformer
  assert manifest["tasks"]["depth"]["label_resolution"]["relative_to_image"] == 0.5
  for record in read_records(out):
    assert record["labels"].tasks() == ("seg", "depth", "normals", "det")
    assert record["labels"].seg.shape == record["labels"].depth.shape == (20, 24)
  with pytest.raises(ValueError, match="depth='nope'"):
    _load_config("zoo", "depth=nope")


# ---------------------------------------------------------------------------------------------
# Resumability


def _toyworld_experts(tasks=("seg", "depth"), **kwargs):
  return base.build_experts({t: dict({"kind": "toyworld"}, **kwargs) for t in tasks})


def _tool(*args):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  return [sys.executable, os.path.join(REPO, "tools", "pseudo_label.py"), *args], env


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_every_key_once(tmp_path):
  pattern, keys = toyworld_tars(str(tmp_path), num_tars=6, per_tar=40)
  out = str(tmp_path / "out")
  command, env = _tool("--config=configs/pseudo_label/toyworld.py:batch_size=4,tasks=seg+depth",
                       f"--corpus=tar:{pattern}", f"--output_dir={out}")
  first_sidecar = shards.sidecar_path(os.path.join(out, shards.shard_name("train", 0, 6)))
  process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not os.path.exists(first_sidecar) and process.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  complete = [n for n in sorted(os.listdir(out)) if n.endswith(".tfrecord") and
              shards.is_complete(os.path.join(out, n))]
  assert 1 <= len(complete) < 6, "the kill must land mid-run"
  assert not os.path.exists(os.path.join(out, shards.MANIFEST_NAME))
  before = {n: shards.file_sha256(os.path.join(out, n)) for n in complete}
  mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in complete}

  rerun = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "img/s" in rerun.stdout and "ETA" in rerun.stdout
  verify = subprocess.run(_tool("--verify", f"--output_dir={out}")[0], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert verify.returncode == 0 and f"{out}: OK" in verify.stdout, verify.stdout + verify.stderr
  assert sorted(r["key"] for r in read_records(out)) == sorted(keys)  # exactly once
  for name in complete:  # complete shards were skipped, not rewritten
    assert os.stat(os.path.join(out, name)).st_mtime_ns == mtimes[name]
    assert shards.file_sha256(os.path.join(out, name)) == before[name]
  # The resumed directory is the same as an uninterrupted run's.
  clean = str(tmp_path / "clean")
  job.run_worker(corpus_lib.TarCorpus(pattern), _toyworld_experts(), clean,
                 job.JobOptions(batch_size=4), log=quiet)
  for resumed, uninterrupted in zip(shards.read_manifest(out)["shards"],
                                    shards.read_manifest(clean)["shards"]):
    assert resumed == uninterrupted


def test_partial_shards_are_redone_and_other_workers_files_kept(tmp_path):
  pattern, keys = toyworld_tars(str(tmp_path), num_tars=4, per_tar=5)
  out = str(tmp_path / "out")
  experts = _toyworld_experts()
  assert job.run_worker(corpus_lib.TarCorpus(pattern), experts, out, num_workers=2,
                        worker_index=0, log=quiet) is None  # worker 1's shards are missing
  names = [shards.shard_name("train", i, 4) for i in range(4)]
  assert [shards.is_complete(os.path.join(out, n)) for n in names] == [True, False, True, False]
  # Simulate a kill of worker 0 after shard 2's rename, and worker 1 writing shard 1 right now.
  os.remove(shards.sidecar_path(os.path.join(out, names[2])))
  busy = os.path.join(out, names[1] + ".tmp-999999")
  open(busy, "w").close()
  job.run_worker(corpus_lib.TarCorpus(pattern), experts, out, num_workers=2, worker_index=0,
                 log=quiet)
  assert shards.is_complete(os.path.join(out, names[2])) and os.path.exists(busy)
  os.remove(busy)
  manifest = job.run_worker(corpus_lib.TarCorpus(pattern), experts, out, num_workers=2,
                            worker_index=1, log=quiet)
  assert manifest["num_records"] == 20 and job.verify_job(out) == []
  assert sorted(r["key"] for r in read_records(out)) == sorted(keys)


def test_rerun_with_another_config_is_refused_naming_only_what_differs(tmp_path):
  pattern, _ = toyworld_tars(str(tmp_path), num_tars=1, per_tar=3)
  out = str(tmp_path / "out")
  job.run_worker(corpus_lib.TarCorpus(pattern), _toyworld_experts(), out, log=quiet)
  with pytest.raises(job.JobError) as refused:
    job.run_worker(corpus_lib.TarCorpus(pattern), _toyworld_experts(label_max_side=16), out,
                   log=quiet)
  message = str(refused.value)
  assert "plan.json" in message and "experts.seg.label_resolution.max_side: expected null, found 16" in message
  assert "experts.depth.label_resolution.max_side" in message
  assert "relative_to_image" not in message and "corpus" not in message and len(message) < 600


@pytest.fixture(scope="module")
def segformer(tmp_path_factory):
  return tiny.save_segformer(str(tmp_path_factory.mktemp("segformer") / "model"))


def _seg_job(source, out, pattern, **expert):
  experts = base.build_experts({"seg": dict(kind="hf_semantic", source=source, device="cpu", **expert)})
  return job.run_worker(corpus_lib.TarCorpus(pattern), experts, out, log=quiet)


def test_resume_refuses_another_dtype_or_processor_config(tmp_path, segformer):
  """dtype and the processor config change labels as much as the weights: a resume must not mix."""
  import shutil
  pattern, _ = toyworld_tars(str(tmp_path), num_tars=2, per_tar=2)
  out = str(tmp_path / "out")
  model = shutil.copytree(segformer, tmp_path / "model")
  _seg_job(str(model), out, pattern)
  os.remove(shards.sidecar_path(os.path.join(out, shards.shard_name("train", 1, 2))))  # partial
  with pytest.raises(job.JobError, match=r"experts\.seg\.expert\.dtype: expected \"float32\", "
                                         r"found \"bfloat16\"\. Use a new"):
    _seg_job(str(model), out, pattern, dtype="bfloat16")
  config_path = model / "preprocessor_config.json"
  original = config_path.read_text()
  config_path.write_text(json.dumps(dict(json.loads(original), image_mean=[0.4, 0.4, 0.4])))
  with pytest.raises(job.JobError) as refused:
    _seg_job(str(model), out, pattern)
  assert "experts.seg.expert.config_sha256: expected" in str(refused.value)
  assert "weights_sha256" not in str(refused.value) and "dtype" not in str(refused.value)
  config_path.write_text(original)  # the original config resumes
  assert _seg_job(str(model), out, pattern)["num_records"] == 4
  assert shards.read_manifest(out)["tasks"]["seg"]["expert"]["dtype"] == "float32"


def test_detection_settings_belong_to_the_identity():
  from clipzoo_jax.experts import hf_instance
  expert = object.__new__(hf_instance.HFDetectionExpert)
  expert.task, expert.source, expert.threshold, expert.max_detections = "det", "x", 0.3, 7
  expert.classes = ("a",)
  expert.model = types.SimpleNamespace(weights_sha256=lambda: "w", settings=lambda: {"dtype": "float32"})
  entry = expert.manifest_entry()
  assert entry["score_threshold"] == 0.3 and entry["max_detections"] == 7
  assert entry["expert"]["dtype"] == "float32"


def test_verify_finds_a_tampered_shard(tmp_path):
  pattern, _ = toyworld_tars(str(tmp_path), num_tars=2, per_tar=3)
  out = str(tmp_path / "out")
  job.run_worker(corpus_lib.TarCorpus(pattern), _toyworld_experts(("seg",)), out, log=quiet)
  with open(os.path.join(out, shards.shard_name("train", 1, 2)), "ab") as f:
    f.write(b"junk")
  problems = job.verify_job(out)
  assert any("sha256" in p and "train-00001-of-00002" in p for p in problems)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_are_listed_by_key_and_the_job_finishes(tmp_path):
  scenes = [toyworld.render_scene(1, i, 32) for i in range(6)]
  png = io.BytesIO()
  Image.fromarray(scenes[4].image).save(png, format="PNG")
  good_jpeg = records.encode_jpeg(scenes[0].image)
  members = [
      (scenes[0].key + ".jpg", good_jpeg), (scenes[0].key + ".txt", scenes[0].caption.encode()),
      (scenes[1].key + ".jpg", good_jpeg[:40] + b"garbage" * 10), (scenes[1].key + ".txt", b"c"),
      (scenes[2].key + ".jpg", records.encode_jpeg(scenes[2].image)),  # no caption
      (scenes[3].key + ".txt", b"caption without image"),
      (scenes[4].key + ".png", png.getvalue()), (scenes[4].key + ".txt", scenes[4].caption.encode()),
      (scenes[5].key + ".jpg", records.encode_jpeg(scenes[5].image)), (scenes[5].key + ".txt", b" "),
  ]
  pattern = write_tar(tmp_path / "00000.tar", members)
  out = str(tmp_path / "out")
  manifest = job.run_worker(corpus_lib.TarCorpus(pattern), _toyworld_experts(("seg",)), out,
                            job.JobOptions(batch_size=2), log=quiet)
  with open(os.path.join(out, report.REPORT_NAME)) as f:
    bad = {item["key"]: item["reason"] for item in json.load(f)["items"]}
  assert bad[scenes[1].key].startswith("undecodable image")
  assert bad[scenes[2].key] == "missing caption" and bad[scenes[5].key] == "missing caption"
  assert bad[scenes[3].key].startswith("missing image")
  assert len(bad) == 4
  assert manifest["counts"] == {"read": 6, "written": 2, "bad": 4}
  assert manifest["bad_inputs"]["by_reason"] == {"missing caption": 2, "missing image": 1,
                                                 "undecodable image": 1}
  written = {r["key"]: r for r in read_records(out)}
  assert sorted(written) == sorted([scenes[0].key, scenes[4].key])
  # The PNG source was re-encoded to JPEG for the loader; its labels are still exact.
  np.testing.assert_array_equal(written[scenes[4].key]["labels"].seg, scenes[4].labels.seg)
  assert job.verify_job(out) == []


def test_remove_partial_can_be_limited_to_named_shards(tmp_path):
  for name in ("a-00000-of-00002.tfrecord.tmp-1", "a-00001-of-00002.tfrecord.tmp-2",
               "a-00001-of-00002.tfrecord"):
    (tmp_path / name).write_bytes(b"")
  removed = shards.remove_partial(str(tmp_path), names=["a-00001-of-00002.tfrecord"])
  assert removed == ["a-00001-of-00002.tfrecord", "a-00001-of-00002.tfrecord.tmp-2"]
  assert os.listdir(tmp_path) == ["a-00000-of-00002.tfrecord.tmp-1"]


def test_progress_line_has_rate_and_eta(monkeypatch):
  clock = iter([0.0, 10.0, 10.0, 10.0, 10.0, 10.0])
  monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
  lines = []
  progress = report.ShardProgress("worker 0/1", [100, None, 100], lines.append, every_s=1e9)
  progress.add(100, 2)
  progress.shard_done()  # 100 images in 10 s; 200 to go (the unknown shard counts as 100)
  assert lines == ["worker 0/1: shard 1/3 | 100 images (2 bad) | 10.0 img/s | ETA 0:00:20"]


# ---------------------------------------------------------------------------------------------
# Keys, failing experts, reports


def _two_img2dataset_outputs(tmp_path):
  """Two tar folders whose keys both start at 000000000, as img2dataset writes them."""
  for folder, seed in (("a", 0), ("b", 1)):
    (tmp_path / folder).mkdir()
    scenes = [toyworld.render_scene(seed, i, 32) for i in range(2)]
    write_tar(tmp_path / folder / "00000.tar", [
        m for i, scene in enumerate(scenes) for m in ((f"{i:09d}.jpg", records.encode_jpeg(scene.image)),
                                                      (f"{i:09d}.txt", scene.caption.encode()))])
  return str(tmp_path / "{a,b}" / "00000.tar")


def test_keys_repeated_across_tars_are_refused_before_labelling(tmp_path):
  pattern = _two_img2dataset_outputs(tmp_path)
  out = str(tmp_path / "out")
  with pytest.raises(corpus_lib.CorpusError, match=r"2 keys occur more than once, e\.g\. key "
                     r"'000000000' in .*a/00000\.tar and in .*b/00000\.tar.*key_by_source=True"):
    job.run_worker(corpus_lib.TarCorpus(pattern), _toyworld_experts(("seg",)), out, log=quiet)
  assert not os.path.exists(out) or not shards.shard_paths(out)
  manifest = job.run_worker(corpus_lib.TarCorpus(pattern, key_by_source=True), {}, out, log=quiet)
  assert manifest["num_records"] == 4 and job.verify_job(out) == []
  assert sorted(r["key"] for r in read_records(out)) == ["a/00000/000000000", "a/00000/000000001",
                                                         "b/00000/000000000", "b/00000/000000001"]


class _FailingExpert(base.Expert):
  """Labels like the toy-world expert, but its forward pass raises on one key."""
  task, kind, source = "seg", "failing", "test"

  def __init__(self, bad_key):
    self.bad_key, self.inner = bad_key, base.build_expert("seg", {"kind": "toyworld"})
    self.classes = self.inner.classes

  def run(self, prepared, batch):
    if self.bad_key in batch.keys:
      raise RuntimeError("CUDA error: device-side assert triggered")
    return self.inner.run(prepared, batch)


def test_an_expert_failing_names_expert_shard_and_keys_or_its_records_are_skipped(tmp_path):
  pattern, keys = toyworld_tars(str(tmp_path), num_tars=2, per_tar=4)
  bad = keys[5]
  out = str(tmp_path / "stop")
  with pytest.raises(job.ExpertRunError) as stopped:
    job.run_worker(corpus_lib.TarCorpus(pattern), {"seg": _FailingExpert(bad)}, out,
                   job.JobOptions(batch_size=4), log=quiet)
  message = str(stopped.value)
  for part in ("expert seg (failing from 'test')", "train-00001-of-00002", repr(bad),
               "RuntimeError: CUDA error", "on_expert_error=skip"):
    assert part in message
  out = str(tmp_path / "skip")
  manifest = job.run_worker(corpus_lib.TarCorpus(pattern), {"seg": _FailingExpert(bad)}, out,
                            job.JobOptions(batch_size=4, on_expert_error="skip"), log=quiet)
  assert manifest["counts"] == {"read": 8, "written": 7, "bad": 1} and job.verify_job(out) == []
  with open(os.path.join(out, report.REPORT_NAME)) as f:
    assert [(i["key"], i["reason"]) for i in json.load(f)["items"]] == [
        (bad, "expert failed: seg (failing): RuntimeError: CUDA error: device-side assert triggered")]
  with pytest.raises(job.JobError, match="on_expert_error: expected one of"):
    job.JobOptions(on_expert_error="ignore")


def test_identical_runs_write_identical_bad_input_reports(tmp_path):
  scene = toyworld.render_scene(0, 0, 32)
  jpeg = records.encode_jpeg(scene.image)
  write_tar(tmp_path / "00000.tar", [("a.jpg", b"not an image at all"), ("a.txt", b"c"),
                                     ("b.jpg", jpeg), ("b.txt", b"c")])
  path = write_tar(tmp_path / "00001.tar", [(f"{i}.jpg", jpeg * 20) for i in range(4)])
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])  # truncated
  reports = []
  for run in ("one", "two"):
    out = str(tmp_path / run)
    job.run_worker(corpus_lib.TarCorpus(str(tmp_path / "{00000..00001}.tar")), {}, out, log=quiet)
    with open(os.path.join(out, report.REPORT_NAME), "rb") as f:
      reports.append(f.read())
  assert reports[0] == reports[1]
  merged = json.loads(reports[0])
  assert set(merged["by_reason"]) == {"undecodable image", "unreadable tar", "missing caption"}
  assert " at 0x" not in reports[0].decode()


def test_image_an_expert_cannot_preprocess_is_reported_with_its_size():
  class Picky(base.Expert):
    task, kind, source = "depth", "picky", "test"

    def prepare(self, image, key):
      raise ValueError("Size must contain 'height' and 'width' keys")

    def run(self, prepared, batch):
      raise AssertionError("not reached")

  item = corpus_lib.Item("k", records.encode_jpeg(np.zeros((1, 40, 3), np.uint8)), "a caption")
  bad = job.decode_item(item, {"depth": Picky()}, 95)
  assert bad.category == "image cannot be labelled"
  assert "expert depth cannot preprocess a 1x40 image" in bad.reason


def test_finished_directory_is_recognised_without_experts(tmp_path):
  pattern, _ = toyworld_tars(str(tmp_path), num_tars=2, per_tar=2)
  out = str(tmp_path / "out")
  settings = {"experts": {"seg": {"kind": "toyworld"}}, "corpus": {"pattern": pattern}}
  assert job.finished_job(out, settings) is None
  job.run_worker(corpus_lib.TarCorpus(pattern), _toyworld_experts(("seg",)), out, log=quiet,
                 settings=settings)
  assert job.finished_job(out, settings)["num_records"] == 4
  assert job.finished_job(out, dict(settings, experts={"seg": {"kind": "other"}})) is None
  os.remove(shards.sidecar_path(os.path.join(out, shards.shard_name("train", 1, 2))))
  assert job.finished_job(out, settings) is None
