"""Evaluators (clipzoo_jax/evals) against independent computations on a tiny model: zero-shot and
retrieval from the model's own embeddings in plain NumPy, padded last batches counted once, one
device against eight, probes that learn, CenterNet decoding as the inverse of the det targets, and
config / dataset mistakes named in one error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clipzoo_jax import cli, evals
from clipzoo_jax.data import normalization, toyworld
from clipzoo_jax.data import tokenizer as tokenizer_lib
from clipzoo_jax.evals import base, datasets, det_decode, metrics, prompts
from clipzoo_jax.models import clip
from clipzoo_jax.tasks import det
from tests import helpers

SIZE = 32  # the tiny model's image size: toy scenes rendered at it need no resize


def tiny_eval_config(tasks=("normals",)):
  """The tiny model with one head of its own (probes train theirs); vocab fits a BPE."""
  config = helpers.tiny_config(tasks)
  config.model.text.vocab_size = 600
  config.tokenizer.directory = "tokenizer"
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding a tokenizer trained on toy captions and the toy class names."""
  path = tmp_path_factory.mktemp("evals")
  captions = [toyworld.render_scene(0, i, SIZE).caption for i in range(150)]
  tokenizer_lib.train_tokenizer(captions + list(datasets.TOYWORLD_CLASSES), 600,
                                str(path / "tokenizer"))
  return str(path)


@pytest.fixture(scope="module")
def tiny(workdir):
  """(config, run on a 4x2 mesh, params) of the tiny model."""
  config = tiny_eval_config()
  run = helpers.run_on(config, [4, 2, 1])
  model = clip.CLIPTeX(config.model)
  image, tokens = jnp.zeros((2, SIZE, SIZE, 3)), jnp.zeros((2, 8), jnp.int32)
  init = jax.jit(lambda rng: nn.unbox(model.init(rng, image, tokens))["params"])
  params = init(jax.random.PRNGKey(0))  # no optimizer state: evaluators read params only
  return config, run, jax.device_put(params, run.state_shardings["params"])


def _evaluators(config, run, workdir, **evals_config):
  config = config.copy_and_resolve_references()
  config.evals = ml_collections.ConfigDict(evals_config)
  return {ev.name: ev for ev in evals.build_evaluators(config, run, workdir)}


def _clip_images(images):
  return ((images / 255.0 - np.array(normalization.CLIP_MEAN)) /
          np.array(normalization.CLIP_STD)).astype(np.float32)


def _numpy_embeddings(config, params, images=None, tokens=None):
  """Unit embeddings of all inputs in one call: no mesh, no batching, no padding."""
  model = clip.CLIPTeX(config.model)
  if images is not None:
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, method=clip.CLIPTeX.encode_image)[0])(
        jax.device_get(params), jnp.asarray(images, jnp.float32))
  else:
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, method=clip.CLIPTeX.encode_text))(
        jax.device_get(params), jnp.asarray(tokens))
  out = np.asarray(out, np.float64)
  return out / np.linalg.norm(out, axis=-1, keepdims=True)


def _toy_classification(count, seed):
  """Images and labels recomputed here: the largest visible object's colour and shape."""
  images, labels, index = [], [], 0
  while len(labels) < count:
    scene = toyworld.render_scene(seed, index, SIZE)
    index += 1
    if not scene.visible:
      continue
    pixels = [np.sum(scene.instances == i) for i in scene.visible]
    obj = scene.objects[scene.visible[int(np.argmax(pixels))]]
    images.append(scene.image)
    labels.append(datasets.TOYWORLD_CLASSES.index(f"{obj.colour} {obj.shape}"))
  return _clip_images(np.stack(images).astype(np.float64)), np.array(labels)


def test_zeroshot_matches_numpy_and_padding_counts_each_example_once(tiny, workdir):
  config, run, params = tiny
  dataset = dict(kind="classification", num_examples=40, seed=7, size=SIZE)
  evaluators = _evaluators(config, run, workdir,
                           padded=dict(type="zeroshot", batch_size=16, dataset=dataset),
                           exact=dict(type="zeroshot", batch_size=8, dataset=dataset))
  padded = dict(evaluators["padded"].run(params))  # 40 = 16 + 16 + 8 real rows
  exact = dict(evaluators["exact"].run(params))

  images, labels = _toy_classification(40, seed=7)
  tokenizer = tokenizer_lib.Tokenizer.from_pretrained(f"{workdir}/tokenizer", 8)
  templates = prompts.TOYWORLD_TEMPLATES
  text = _numpy_embeddings(config, params, tokens=tokenizer.encode(
      prompts.prompts(datasets.TOYWORLD_CLASSES, templates)))
  classes = text.reshape(len(datasets.TOYWORLD_CLASSES), len(templates), -1).mean(1)
  classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
  logits = _numpy_embeddings(config, params, images=images) @ classes.T
  order = np.argsort(-logits, axis=1)
  top1 = np.mean(order[:, 0] == labels)
  top5 = np.mean([label in row[:5] for label, row in zip(labels, order)])
  assert padded == pytest.approx({"padded/top1": top1, "padded/top5": top5})
  assert exact == pytest.approx({"exact/top1": top1, "exact/top5": top5})


def test_toy_classification_labels_by_colour_and_shape_agree():
  by = {label: datasets.toyworld_classification(12, 7, SIZE, label) for label in
        ("object", "colour", "shape")}
  batches = {k: next(split.batches(base.augment_options(tiny_eval_config()), 12))["label"]
             for k, split in by.items()}
  objects = [datasets.TOYWORLD_CLASSES[i] for i in batches["object"]]
  assert [by["colour"].classes["label"][i] for i in batches["colour"]] == [
      name.split(" ")[0] for name in objects]
  assert [by["shape"].classes["label"][i] for i in batches["shape"]] == [
      name.split(" ")[1] for name in objects]


def test_retrieval_matches_numpy_recall(tiny, workdir):
  config, run, params = tiny
  evaluator = _evaluators(config, run, workdir, ret=dict(
      type="retrieval", batch_size=16, dataset=dict(kind="retrieval", num_examples=24, seed=5,
                                                    size=SIZE, captions_per_image=3)))["ret"]
  result = dict(evaluator.run(params))
  scenes = datasets.toyworld_scenes(24, 5, SIZE)
  captions = [datasets.scene_captions(s, 5, toyworld.parse_key(s.key)[1], 3) for s in scenes]
  assert all(c[0] == s.caption for c, s in zip(captions, scenes))
  tokenizer = tokenizer_lib.Tokenizer.from_pretrained(f"{workdir}/tokenizer", 8)
  text = _numpy_embeddings(config, params,
                           tokens=tokenizer.encode([c for cs in captions for c in cs]))
  images = _numpy_embeddings(config, params, images=_clip_images(
      np.stack([s.image for s in scenes]).astype(np.float64)))
  similarity = images @ text.T
  owner = np.repeat(np.arange(24), 3)
  image_hit = np.mean(owner[similarity.argmax(1)] == np.arange(24))
  text_hit = np.mean(similarity.argmax(0) == owner)
  assert result["ret/image_to_text/recall_at_1"] == pytest.approx(image_hit)
  assert result["ret/text_to_image/recall_at_1"] == pytest.approx(text_hit)
  assert set(result) == {f"ret/{d}/recall_at_{k}" for d in ("image_to_text", "text_to_image")
                         for k in (1, 5, 10)}


def _probe_config(task, head="linear", steps=40):
  return dict(type="dense_probe", task=task, head=head, steps=steps, batch_size=16, hidden=16,
              learning_rate=3e-3, train_dataset=dict(kind="dense", num_examples=128, seed=3,
                                                     size=SIZE, split="probe_train"),
              dataset=dict(kind="dense", num_examples=48, seed=4, size=SIZE))


@pytest.mark.slow
def test_one_device_and_eight_give_the_same_numbers(tiny, workdir):
  config, run8, params8 = tiny
  run1 = helpers.run_on(config, [1, 1, 1], jax.devices()[:1])
  params1 = jax.device_put(jax.device_get(params8), run1.state_shardings["params"])
  setup = dict(zs=dict(type="zeroshot", batch_size=16,
                       dataset=dict(kind="classification", num_examples=24, size=SIZE)),
               seg=_probe_config("seg", steps=10))
  results = []
  for run, params in ((run1, params1), (run8, params8)):
    results.append({name: value for ev in _evaluators(config, run, workdir, **setup).values()
                    for name, value in ev.run(params)})
  assert results[0].keys() == results[1].keys()
  for name in results[0]:
    assert results[0][name] == pytest.approx(results[1][name], rel=1e-3, abs=1e-4), name


@pytest.mark.slow
def test_probes_learn_above_a_trivial_baseline(tiny, workdir):
  config, run, params = tiny
  evaluators = _evaluators(config, run, workdir, seg=_probe_config("seg", "light", steps=30),
                           depth=_probe_config("depth", steps=30))
  seg, depth = dict(evaluators["seg"].run(params)), dict(evaluators["depth"].run(params))
  # trivial baselines on the same eval split: the most frequent class, a constant depth
  batches = list(evaluators["seg"].dataset.batches(evaluators["seg"].augment_options(16), 48))
  labels = np.concatenate([b["seg"] for b in batches])
  majority = np.bincount(labels[labels >= 0]).max() / np.sum(labels >= 0)
  target = np.concatenate([b["depth"] for b in batches])
  constant = metrics.DepthMetrics()
  constant.update(np.broadcast_to(np.median(target[target > 0]), target.shape), target)
  assert seg["seg/pixel_accuracy"] > majority + 0.1, (seg, majority)
  assert seg["seg/miou"] > 0.2, seg
  assert depth["depth/delta1"] > constant.result()["delta1"] + 0.05, (depth, constant.result())
  assert depth["depth/abs_rel"] < constant.result()["abs_rel"], depth


@pytest.mark.slow
def test_model_heads_and_det_probe_report_their_metrics(tiny, workdir):
  config, run, params = tiny
  evaluators = _evaluators(config, run, workdir,
                           normals=dict(_probe_config("normals", "model"), steps=0),
                           det=_probe_config("det", "light", steps=5))
  normals, found = dict(evaluators["normals"].run(params)), dict(evaluators["det"].run(params))
  assert set(normals) == {f"normals/{k}" for k in ("mean", "median", "rmse", "within_11_25",
                                                   "within_22_5", "within_30")}
  assert 0 < normals["normals/mean"] < 180
  assert {"det/ap", "det/ap50", "det/ap75", "det/probe_train_loss"} == set(found)
  assert 0 <= found["det/ap"] <= found["det/ap50"] <= 1


@pytest.mark.parametrize("task", ["depth", "det"])
def test_cached_features_train_the_same_probe_as_recomputed_ones(tiny, workdir, task):
  """cache_features runs the encoder once per example. With a training split of exactly one
  batch every step sees all of it, so the probe, its loss and its metrics equal those of the
  probe that recomputes features each step; the linear probe's det heatmap starts at the
  CenterNet prior, so its first loss is that of a near-empty prediction, not of p=0.5."""
  config, run, params = tiny
  probe = dict(_probe_config(task, steps=6), train_dataset=dict(
      kind="dense", num_examples=16, seed=3, size=SIZE, split="probe_train"))
  found = [dict(_evaluators(config, run, workdir, p=dict(probe, cache_features=cached))["p"]
                .run(params)) for cached in (False, True)]
  assert found[0].keys() == found[1].keys()
  for name in found[0]:
    assert found[1][name] == pytest.approx(found[0][name], rel=1e-4, abs=1e-6), name
  if task == "det":
    assert found[0]["p/probe_train_loss"] < 20, found[0]


def test_centernet_decoding_inverts_the_det_targets():
  boxes = jnp.array([[[0.1, 0.2, 0.5, 0.6], [0.55, 0.05, 0.95, 0.45], [0, 0, 0, 0]]])
  classes = jnp.array([[2, 0, -1]])
  size = (16, 16)
  heatmap, cell, sizes, offsets, valid = det.det_targets(boxes, classes, 3, size)
  dense = lambda values: jnp.zeros((1, *size, 2)).at[0, cell[0, :2, 0], cell[0, :2, 1]].set(
      values[0, :2])
  logits = jnp.log(jnp.clip(heatmap, 1e-6, 1 - 1e-6) / (1 - jnp.clip(heatmap, 1e-6, 1 - 1e-6)))
  found, scores, found_classes = det_decode.decode_boxes(logits, dense(sizes), dense(offsets), 5)
  assert valid[0].tolist() == [True, True, False]
  by_class = {int(c): np.asarray(b) for c, b, s in zip(found_classes[0], found[0], scores[0])
              if s > 0.99}
  np.testing.assert_allclose(by_class[2], boxes[0, 0], atol=1e-5)
  np.testing.assert_allclose(by_class[0], boxes[0, 1], atol=1e-5)
  assert np.sum(np.asarray(scores[0]) > 0.99) == 2


def test_no_evals_gives_no_evaluators(tiny, workdir):
  config, run, _ = tiny
  assert evals.build_evaluators(config, run, workdir) == []
  config = config.copy_and_resolve_references()
  del config["evals"]
  assert evals.build_evaluators(config, run, workdir) == []


@pytest.mark.parametrize("evaluator,message", [
    (dict(type="zeroshot", dataset=dict(kind="dense")),
     "config.evals.bad.dataset: evaluator bad (type 'zeroshot') needs labels ['label'], but "
     "dataset shards"),
    (dict(type="retrieval", dataset=dict(kind="classification")),
     "needs labels ['captions'], but dataset toyworld classification"),
    (dict(type="nope"), "config.evals.bad.type: expected one of"),
    (dict(type="zeroshot", colour="red"), "config.evals.bad: unknown keys ['colour']"),
    (dict(type="zeroshot", batch_size=12), "config.evals.bad.batch_size: 12 must be a positive "
     "multiple of the 8 devices"),
    (dict(type="dense_probe", task="det", head="model"),
     "head 'model' evaluates the model's own 'det' head, but config.model.heads.tasks is ['seg']"),
    (dict(type="dense_probe", task="pose"), "config.evals.bad.task: expected one of"),
    (dict(type="zeroshot", dataset=dict(source="shards")), "config.evals.bad.dataset.directory: "
     "required"),
    (dict(type="zeroshot", dataset=dict(source="tfds", name="mnist")),
     "config.evals.bad.dataset.name: no adapter for TFDS dataset 'mnist'"),
    (dict(type="zeroshot", templates="fancy"), "config.evals.bad.templates: unknown template set"),
])
def test_bad_configs_are_one_error_naming_key_and_values(workdir, evaluator, message):
  config = tiny_eval_config(tasks=("seg",))
  run = helpers.run_on(config, [8, 1, 1])
  config.evals = ml_collections.ConfigDict({"bad": evaluator})
  with pytest.raises(cli.UserError) as error:
    evals.build_evaluators(config, run, workdir)
  assert message in str(error.value)


def test_schedule_follows_every_and_at_end(tiny, workdir):
  from clipzoo_jax import periodic
  config, run, _ = tiny
  evaluators = _evaluators(config, run, workdir,
                           a=dict(type="zeroshot", every=100),
                           b=dict(type="zeroshot", every=0, at_end=True))
  due = lambda ev, step: ev.every.due(periodic.Moment(step, 300))
  assert [s for s in (99, 100, 200, 250, 300) if due(evaluators["a"], s)] == [100, 200, 300]
  assert [s for s in (100, 200, 300) if due(evaluators["b"], s)] == [300]
  assert not evaluators["a"].every.due(periodic.Moment(150, 300, stopping=True))
  assert isinstance(evaluators["a"], base.Evaluator)


@pytest.mark.parametrize("name,fields,shapes", [
    ("imagenet2012", {"label"}, {"label": (4,)}),
    ("places365_small", {"label"}, {"label": (4,)}),
    ("scene_parse150", {"seg"}, {"seg": (4, 16, 16), "seg_mask": (4,)}),
    ("nyu_depth_v2", {"depth"}, {"depth": (4, 16, 16), "depth_mask": (4,)}),
])
def test_tfds_datasets_by_name_map_onto_evaluator_fields(name, fields, shapes):
  """TFDS's own mock data (no download) through each adapter: fields, shapes, class names."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from clipzoo_jax.data import loader  # pylint: disable=import-outside-toplevel
  options = loader.augment_options(dict(image_size=32, label_size=16))
  with tfds.testing.mock_data(num_examples=5):
    split = datasets.from_config(dict(source="tfds", name=name, split="validation"), "/tmp",
                                 "config.evals.x.dataset")
    batch = next(split.batches(options, 4))
  assert split.fields == fields
  assert batch["image"].shape == (4, 32, 32, 3)
  assert {k: v.shape for k, v in batch.items() if k != "image"} == shapes
  if "label" in fields:
    assert len(split.classes["label"]) == {"imagenet2012": 1000, "places365_small": 365}[name]
