"""Experts against independent references: tiny random Hugging Face models saved with
`save_pretrained` and called directly through the transformers API, onnxruntime called directly,
analytic geometry, Pillow's resize, and the toy-world renderer."""

import hashlib
import os
import types
import warnings

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from transformers import (AutoImageProcessor, AutoModelForDepthEstimation,  # noqa: E402
                          AutoModelForObjectDetection, AutoModelForSemanticSegmentation,
                          AutoModelForUniversalSegmentation)

from clipzoo_jax.data import records  # noqa: E402
from clipzoo_jax.experts import base, depth_normals, resize, tiny  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*requires torchvision.*")

# Two images share a shape, one differs: exercises grouping by processed input shape.
SIZES = [(48, 64), (48, 64), (40, 40)]
KEYS = ["k0", "k1", "k2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Builds each tiny model folder once, on first use."""
  root = tmp_path_factory.mktemp("experts")
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = getattr(tiny, f"save_{name}")(str(root / name))
    return cache[name]
  return get


@pytest.fixture(scope="module")
def images():
  return tiny.random_images(1, SIZES)


def _batch(images):
  return base.Batch(list(KEYS), images, [records.Labels() for _ in images])


def direct(source, auto_class, images, **call_kwargs):
  """Reference: processor + model called directly, one batch per processed input shape."""
  processor = AutoImageProcessor.from_pretrained(source)
  model = auto_class.from_pretrained(source).eval()
  groups = {}
  for i, image in enumerate(images):
    shape = tuple(processor(images=[image], return_tensors="pt")["pixel_values"].shape)
    groups.setdefault(shape, []).append(i)
  for indices in groups.values():
    inputs = processor(images=[images[i] for i in indices], return_tensors="pt", **call_kwargs)
    with torch.no_grad():
      yield processor, indices, model(**inputs)


def _half(size):
  return int(round(size[0] * 0.5)), int(round(size[1] * 0.5))


def _torchvision_resize_shim():
  """torchvision's tensor resize, bicubic without antialias, is torch's bicubic interpolate."""
  def resize_fn(tensor, size, interpolation, antialias):
    return torch.nn.functional.interpolate(tensor[None], size=size, mode="bicubic",
                                           align_corners=False)[0]
  return types.SimpleNamespace(resize=resize_fn,
                               InterpolationMode=types.SimpleNamespace(BICUBIC="bicubic"))


@pytest.mark.parametrize("name, depth_kind", [("dpt", "inverse"), ("depth_anything", "inverse"),
                                              ("zoedepth", "metric")])
def test_hf_depth_matches_direct_call(models, images, monkeypatch, name, depth_kind):
  source = models(name)
  expert = base.build_expert("depth", {"kind": "hf_depth", "source": source, "device": "cpu",
                                       "label_scale": 0.5})
  assert expert.depth_kind == depth_kind
  got = expert.predict(_batch(images))
  if name == "zoedepth":  # transformers 5.23's PIL processor calls torchvision here
    import transformers.models.zoedepth.image_processing_pil_zoedepth as zoe
    monkeypatch.setattr(zoe, "tvF", _torchvision_resize_shim(), raising=False)
  for processor, indices, outputs in direct(source, AutoModelForDepthEstimation, images):
    extra = {"source_sizes": [SIZES[i] for i in indices]} if name == "zoedepth" else {}
    want = processor.post_process_depth_estimation(
        outputs, target_sizes=[_half(SIZES[i]) for i in indices], **extra)
    for i, result in zip(indices, want):
      assert got[i].depth.shape == _half(SIZES[i])
      np.testing.assert_allclose(got[i].depth, result["predicted_depth"].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["segformer", "upernet", "mask2former"])
def test_hf_semantic_matches_direct_call(models, images, name):
  source = models(name)
  expert = base.build_expert("seg", {"kind": "hf_semantic", "source": source, "device": "cpu"})
  auto = AutoModelForUniversalSegmentation if name == "mask2former" else AutoModelForSemanticSegmentation
  model_config = auto.from_pretrained(source).config
  assert expert.classes == tuple(model_config.id2label[i] for i in range(len(model_config.id2label)))
  got = expert.predict(_batch(images))
  for processor, indices, outputs in direct(source, auto, images):
    want = processor.post_process_semantic_segmentation(outputs, target_sizes=[SIZES[i] for i in indices])
    for i, class_map in zip(indices, want):
      np.testing.assert_array_equal(got[i].seg, class_map.numpy())


def _canonical(boxes, classes, scores):
  order = np.lexsort((boxes[:, 0], boxes[:, 1], classes, -scores))
  return boxes[order], classes[order], scores[order]


def test_hf_semantic_oneformer_matches_direct_call(models, images):
  from transformers import AutoProcessor
  source = models("oneformer")
  expert = base.build_expert("seg", {"kind": "hf_semantic", "source": source, "device": "cpu"})
  got = expert.predict(_batch(images))
  processor = AutoProcessor.from_pretrained(source)
  model = AutoModelForUniversalSegmentation.from_pretrained(source).eval()
  inputs = processor(images=images, task_inputs=["semantic"] * 3, return_tensors="pt")
  with torch.no_grad():  # the processor resizes all three to one shape: one batch
    want = processor.post_process_semantic_segmentation(model(**inputs), target_sizes=SIZES)
  for labels, class_map in zip(got, want):
    np.testing.assert_array_equal(labels.seg, class_map.numpy())
  with pytest.raises(base.ExpertError, match="Mask2Former or MaskFormer"):
    base.build_expert("det", {"kind": "hf_instance", "source": source, "device": "cpu"})


@pytest.mark.parametrize("name", ["rtdetr", "detr"])
def test_hf_detection_matches_direct_call(models, images, name):
  source = models(name)
  expert = base.build_expert("det", {"kind": "hf_detection", "source": source, "device": "cpu",
                                     "threshold": 0.0, "max_detections": None})
  got = expert.predict(_batch(images))
  for processor, indices, outputs in direct(source, AutoModelForObjectDetection, images):
    want = processor.post_process_object_detection(outputs, threshold=0.0,
                                                   target_sizes=[SIZES[i] for i in indices])
    for i, result in zip(indices, want):
      height, width = SIZES[i]
      x0, y0, x1, y1 = result["boxes"].numpy().T
      boxes = np.clip(np.stack([y0 / height, x0 / width, y1 / height, x1 / width], 1), 0, 1)
      ref = _canonical(boxes, result["labels"].numpy(), result["scores"].numpy())
      mine = _canonical(got[i].det_boxes, got[i].det_classes, got[i].det_scores)
      assert len(ref[0]) > 0
      np.testing.assert_allclose(mine[0], ref[0], atol=1e-6)
      np.testing.assert_array_equal(mine[1], ref[1])
      np.testing.assert_allclose(mine[2], ref[2], rtol=1e-6)


def test_hf_detection_keeps_the_top_scores(models, images):
  expert = base.build_expert("det", {"kind": "hf_detection", "source": models("rtdetr"),
                                     "device": "cpu", "threshold": 0.0, "max_detections": 3})
  everything = base.build_expert("det", {"kind": "hf_detection", "source": models("rtdetr"),
                                         "device": "cpu", "threshold": 0.0, "max_detections": None})
  top, full = expert.predict(_batch(images))[0], everything.predict(_batch(images))[0]
  np.testing.assert_allclose(top.det_scores, np.sort(full.det_scores)[::-1][:3], rtol=1e-6)


def test_hf_instance_boxes_are_the_extent_of_each_mask(models, images):
  source = models("mask2former")
  expert = base.build_expert("det", {"kind": "hf_instance", "source": source, "device": "cpu",
                                     "threshold": 0.0, "max_detections": None})
  got = expert.predict(_batch(images))
  total = 0
  for processor, indices, outputs in direct(source, AutoModelForUniversalSegmentation, images):
    want = processor.post_process_instance_segmentation(outputs, threshold=0.0,
                                                        target_sizes=[SIZES[i] for i in indices])
    for i, result in zip(indices, want):
      segmentation = result["segmentation"].numpy()
      boxes, classes, scores = [], [], []
      for info in result["segments_info"]:
        rows, cols = np.nonzero(segmentation == info["id"])
        if rows.size:
          h, w = segmentation.shape
          boxes.append([rows.min() / h, cols.min() / w, (rows.max() + 1) / h, (cols.max() + 1) / w])
          classes.append(info["label_id"])
          scores.append(info["score"])
      ref = _canonical(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes),
                       np.asarray(scores, np.float32))
      mine = _canonical(got[i].det_boxes, got[i].det_classes, got[i].det_scores)
      np.testing.assert_allclose(mine[0], ref[0], atol=1e-6)
      np.testing.assert_array_equal(mine[1], ref[1])
      total += len(ref[0])
  assert total > 0


def test_onnx_normals_matches_onnxruntime(tmp_path, images):
  import onnxruntime
  path = tiny.save_normals_onnx(str(tmp_path / "normals.onnx"))
  mean, std, signs = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), (1.0, -1.0, -1.0)
  expert = base.build_expert("normals", {"kind": "onnx_normals", "source": path, "device": "cpu",
                                         "mean": mean, "std": std, "axis_signs": signs,
                                         "label_scale": 0.5})
  got = expert.predict(_batch(images))
  session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
  for image, labels in zip(images, got):
    pixels = ((image / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
    out = session.run(None, {"image": pixels.transpose(2, 0, 1)[None]})[0][0].transpose(1, 2, 0)
    out = out * np.asarray(signs, np.float32)
    want = out / np.linalg.norm(out, axis=-1, keepdims=True)  # the net halves H, W: no resize
    np.testing.assert_allclose(labels.normals, want, atol=1e-5)
  assert expert.weights_sha256() == hashlib.sha256(
      f"normals.onnx {hashlib.sha256(open(path, 'rb').read()).hexdigest()}\n".encode()).hexdigest()


def _plane_depth(height, width, normal, offset, fov):
  """z-depth of the plane normal . P = offset, by ray intersection (independent of the expert)."""
  focal = (width / 2) / np.tan(np.radians(fov) / 2)
  v, u = np.mgrid[0:height, 0:width]
  rays = np.stack([(u - (width - 1) / 2) / focal, (v - (height - 1) / 2) / focal,
                   np.ones((height, width))], -1)
  return offset / (rays @ np.asarray(normal))


def test_normals_from_depth_of_a_plane_are_the_plane_normal():
  normal = np.array([0.2, -0.4, -0.9])
  normal /= np.linalg.norm(normal)  # facing the camera: negative z
  depth = _plane_depth(30, 40, normal, offset=-2.0, fov=70.0)
  assert (depth > 0).all()
  got = depth_normals.normals_from_depth(depth, *depth_normals.intrinsics_for(30, 40, 70.0))
  np.testing.assert_allclose(got.reshape(-1, 3), np.broadcast_to(normal, (1200, 3)), atol=1e-6)


def test_normals_from_depth_marks_invalid_neighbours():
  depth = np.full((10, 10), 3.0)
  depth[4, 4] = 0.0
  got = depth_normals.normals_from_depth(depth, *depth_normals.intrinsics_for(10, 10, 60.0))
  invalid = ~got.any(axis=-1)
  assert invalid[4, 4] and invalid[3, 4] and invalid[5, 4] and invalid[4, 3] and invalid[4, 5]
  assert invalid.sum() == 5
  np.testing.assert_allclose(got[0, 0], [0, 0, -1], atol=1e-6)


def test_depth_normals_expert_reuses_the_depth_task():
  normal = np.array([0.0, -0.6, -0.8])
  experts = base.build_experts({
      "normals": {"kind": "depth_normals", "from_task": "depth", "fov_degrees": 50.0},
      "depth": {"kind": "toyworld"},  # any depth expert; only its depth_kind matters here
  })
  assert list(experts) == ["depth", "normals"]  # dependency order
  depth = _plane_depth(16, 16, normal, -1.5, 50.0)
  batch = base.Batch(["x"], [np.zeros((32, 32, 3), np.uint8)], [records.Labels(depth=depth)])
  (labels,) = experts["normals"].run([None], batch)
  assert labels.normals.shape == (32, 32, 3)  # label resolution follows the image
  inner = labels.normals[4:-4, 4:-4].reshape(-1, 3)  # borders blend with the one-sided edge
  np.testing.assert_allclose(inner, np.broadcast_to(normal, inner.shape), atol=1e-5)
  entry = experts["normals"].manifest_entry()
  assert entry["expert"]["name"] == "depth_normals" and entry["fov_degrees"] == 50.0


@pytest.mark.parametrize("source, target", [((37, 53), (10, 17)), ((20, 30), (45, 61)),
                                            ((64, 64), (16, 16))])
def test_resize_depth_matches_pillow_bilinear_when_all_valid(source, target):
  depth = np.random.default_rng(0).uniform(1, 5, source).astype(np.float32)
  want = np.asarray(Image.fromarray(depth, "F").resize(target[::-1], Image.BILINEAR))
  np.testing.assert_allclose(resize.resize_depth(depth, target), want, rtol=1e-5)


def test_resize_depth_never_blends_invalid_pixels():
  depth = np.zeros((40, 40), np.float32)
  depth[:, 17:] = 5.0  # left part invalid
  got = resize.resize_depth(depth, (10, 10))
  assert set(np.unique(got)) <= {0.0, 5.0}
  assert (got[:, :4] == 0).all() and (got[:, 5:] == 5.0).all()


def test_resize_class_map_is_nearest_like_pillow():
  class_map = np.random.default_rng(0).integers(0, 200, (48, 64)).astype(np.uint8)
  want = np.asarray(Image.fromarray(class_map).resize((16, 12), Image.NEAREST))
  np.testing.assert_array_equal(resize.resize_class_map(class_map, (12, 16)), want)


def test_resize_normals_keeps_unit_length_and_invalid_zero():
  rng = np.random.default_rng(0)
  normals = rng.normal(size=(30, 30, 3))
  normals[:10] = 0.0
  got = resize.resize_normals(normals, (15, 15))
  norms = np.linalg.norm(got, axis=-1)
  assert np.allclose(norms[norms > 0], 1.0, atol=1e-5)
  assert (norms[:5] == 0).all() and (norms[6:] > 0).all()


def test_label_resolution_scale_and_cap():
  assert resize.LabelResolution(0.25).size_for(480, 640) == (120, 160)
  assert resize.LabelResolution(1.0, max_side=100).size_for(480, 640) == (75, 100)
  with pytest.raises(ValueError, match="scale"):
    resize.LabelResolution(1.5)


def test_toyworld_expert_equals_the_renderer():
  from clipzoo_jax.data import toyworld
  scenes = [toyworld.render_scene(3, i, 32) for i in range(3)]
  batch = base.Batch([s.key for s in scenes], [s.image for s in scenes],
                     [records.Labels() for _ in scenes])
  experts = base.build_experts({t: {"kind": "toyworld"} for t in records.TASKS})
  for scene, *labels in zip(scenes, *[e.predict(batch) for e in experts.values()]):
    merged = {t: l for t, l in zip(experts, labels)}
    np.testing.assert_array_equal(merged["seg"].seg, scene.labels.seg)
    np.testing.assert_array_equal(merged["depth"].depth, scene.labels.depth)
    np.testing.assert_array_equal(merged["normals"].normals, scene.labels.normals)
    np.testing.assert_array_equal(merged["det"].det_boxes, scene.labels.det_boxes)
  half = base.build_expert("seg", {"kind": "toyworld", "label_scale": 0.5}).predict(batch)
  np.testing.assert_array_equal(half[0].seg, scenes[0].labels.seg[1::2, 1::2])  # block centres
  assert experts["seg"].classes == toyworld.SEG_CLASSES
  assert experts["depth"].manifest_entry()["depth_kind"] == "metric"


def test_weights_checksum_is_over_the_weight_files(models, tmp_path):
  source = models("segformer")
  expert = base.build_expert("seg", {"kind": "hf_semantic", "source": source, "device": "cpu"})
  digest = hashlib.sha256(open(f"{source}/model.safetensors", "rb").read()).hexdigest()
  want = hashlib.sha256(f"model.safetensors {digest}\n".encode()).hexdigest()
  configs = sorted(n for n in os.listdir(source) if n.endswith(".json"))
  lines = "".join(f"{n} {hashlib.sha256(open(f'{source}/{n}', 'rb').read()).hexdigest()}\n"
                  for n in configs)
  assert expert.manifest_entry()["expert"] == {
      "name": "hf_semantic", "source": source, "weights_sha256": want, "dtype": "float32",
      "config_sha256": hashlib.sha256(lines.encode()).hexdigest(), "processor_kwargs": {},
      "call_kwargs": {}}
  other = tiny.save_segformer(str(tmp_path / "other"), seed=1)
  other_expert = base.build_expert("seg", {"kind": "hf_semantic", "source": other, "device": "cpu"})
  assert other_expert.weights_sha256() != want


def test_bfloat16_autocast_stays_close_to_float32(models, images):
  source = models("dpt")
  fp32 = base.build_expert("depth", {"kind": "hf_depth", "source": source, "device": "cpu"})
  bf16 = base.build_expert("depth", {"kind": "hf_depth", "source": source, "device": "cpu",
                                     "dtype": "bfloat16"})
  for a, b in zip(fp32.predict(_batch(images)), bf16.predict(_batch(images))):
    assert b.depth.dtype == np.float32
    scale = np.abs(a.depth).mean()
    assert np.abs(a.depth - b.depth).mean() < 0.05 * scale
    assert not np.array_equal(a.depth, b.depth)  # autocast really ran in bfloat16


@pytest.mark.parametrize("task, config, message", [
    ("seg", {"kind": "nope"}, "experts.seg.kind"),
    ("depth", {"kind": "hf_depth", "source": "/no/such/dir"}, "/no/such/dir"),
    ("depth", {"kind": "hf_depth", "source": "x", "dtype": "float8"}, "float8"),
    ("normals", {"kind": "depth_normals"}, "exactly one of"),
    ("normals", {"kind": "onnx_normals", "source": "/no/file.onnx"}, "/no/file.onnx"),
    ("seg", {"kind": "toyworld", "bogus": 1}, "bogus"),
])
def test_config_errors_name_the_field(task, config, message):
  with pytest.raises(base.ExpertError, match=message.replace(".", r"\.")):
    base.build_expert(task, config)


def test_missing_dependency_is_reported():
  with pytest.raises(base.ExpertError, match="needed tasks"):
    base.build_experts({"normals": {"kind": "depth_normals", "from_task": "depth"}})


@pytest.mark.parametrize("shape", [(3, 40), (1, 40), (1, 1), (4, 40)])
def test_thin_and_tiny_images_are_read_channels_last(models, shape):
  """A 3xW or 1xW image is (H, W, 3), not channels-first: the left half red and the right half blue
  stays so in the model input, and the label has the image's shape."""
  expert = base.build_expert("seg", {"kind": "hf_semantic", "source": models("segformer"),
                                     "device": "cpu"})
  image = np.zeros(shape + (3,), np.uint8)
  image[:, :max(1, shape[1] // 2), 0] = 255
  image[:, max(1, shape[1] // 2):, 2] = 255
  pixels = expert.prepare(image, "k")["pixel_values"][0].numpy()
  assert pixels.shape[0] == 3
  if shape[1] > 1:
    assert pixels[0, :, :8].mean() > pixels[0, :, -8:].mean()  # red on the left
    assert pixels[2, :, -8:].mean() > pixels[2, :, :8].mean()  # blue on the right
  labels = expert.run([expert.prepare(image, "k")], base.Batch(["k"], [image], [records.Labels()]))
  assert labels[0].seg.shape == shape
