"""Evaluation datasets, chosen by an evaluator's `dataset` config, all read the same way: a fixed
order, central crops at the model's resolution, dense labels at the probe's label size, and one
pass (or a seeded, shuffled repeat for probe training).

Sources (`dataset.source`):
- `toyworld` (the offline default): labelled splits of the built-in toy world on seeds the
  training data does not use. `kind=classification`: the class of an image is the colour and
  shape of its largest object ("red sphere", 30 classes, names usable in prompts; `label=colour`
  or `label=shape`: its colour or its shape alone);
  `kind=retrieval`: several captions per image, drawn from the caption grammar; `kind=dense`:
  toy-world shards (seg, depth, normals, det, one caption) written once under the workdir.
- `shards`: our own pseudo-labelled TFRecord shards (`directory`, relative to the workdir).
- `tfds`: a TFDS dataset by `name` and `split` from the user's prepared `data_dir`
  (`TFDS_ADAPTERS` maps each known dataset's features onto ours).

Every split declares the label `fields` it has (label, captions, seg, depth, normals, det), so an
evaluator that needs one it lacks fails at build time, naming both (`require`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf

from clipzoo_jax import cli
from clipzoo_jax import storage
from clipzoo_jax.data import augment, loader, prepare, shards, toyworld

FIELDS = ("label", "captions", "seg", "depth", "normals", "det")
SOURCES = ("toyworld", "shards", "tfds")
TOYWORLD_KINDS = ("classification", "retrieval", "dense")
TOYWORLD_CLASSES = tuple(f"{colour} {shape}" for colour in toyworld.OBJECT_COLOURS
                         for shape in toyworld.DET_CLASSES)
# What a toy-world classification label names: the largest object's colour and shape (30 classes),
# its colour alone (10) or its shape alone (3).
TOYWORLD_LABELS = {"object": TOYWORLD_CLASSES, "colour": tuple(toyworld.OBJECT_COLOURS),
                   "shape": toyworld.DET_CLASSES}
SHUFFLE_BUFFER = 1024


@dataclasses.dataclass
class EvalSplit:
  """One evaluation dataset: what it has, and how to read it as NumPy batches.

  `make_dataset(options)` builds the tf.data.Dataset of preprocessed examples in a fixed order
  (`options`: `data.augment.AugmentOptions` for image size, label size and max boxes)."""
  description: str
  fields: frozenset
  classes: dict  # field -> class names ("label", "seg", "det")
  depth_kind: str | None
  make_dataset: Callable

  def batches(self, options, batch_size: int, repeat: bool = False,
              seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` (one pass: the last may be short; repeat: shuffled, full)."""
    dataset = self.make_dataset(options)
    if repeat:
      dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.batch(batch_size, drop_remainder=repeat)
    tf_options = tf.data.Options()
    tf_options.deterministic = True
    yield from dataset.prefetch(2).with_options(tf_options).as_numpy_iterator()


def require(split: EvalSplit, needed, where: str, evaluator: str) -> None:
  """An evaluator that needs labels the dataset does not have is an error naming both."""
  missing = sorted(set(needed) - set(split.fields))
  if missing:
    raise cli.UserError(f"{where}: evaluator {evaluator} needs labels {missing}, but dataset "
                        f"{split.description} has only {sorted(split.fields)}")


# ---------------------------------------------------------------------------------------------
# Preprocessing of raw examples (toy-world classification / retrieval, TFDS).


def preprocess(example: Mapping, options) -> dict:
  """A raw example (uint8 image of any size, optional labels) as evaluators read it: central
  crop, CLIP-normalized image, dense labels nearest-resized to the label size, padded boxes."""
  image = example["image"]
  window, flip = augment.sample_window_and_flip(None, tf.shape(image)[:2], options, train=False)
  out = {"image": augment.augment_image(image, window, flip, options.image_size,
                                        options.antialias)}
  if "label" in example:
    out["label"] = tf.cast(example["label"], tf.int32)
  if "captions" in example:
    out["captions"] = example["captions"]
  dense = lambda name: augment.augment_dense(example[name], window, flip, options.label_size)
  if "seg" in example:
    out["seg"], out["seg_mask"] = tf.cast(dense("seg"), tf.int32), tf.constant(1.0)
  if "depth" in example:
    out["depth"], out["depth_mask"] = tf.cast(dense("depth"), tf.float32), tf.constant(1.0)
  if "normals" in example:
    out["normals"], out["normals_mask"] = tf.cast(dense("normals"), tf.float32), tf.constant(1.0)
  if "det_boxes" in example:
    boxes, classes = example["det_boxes"], tf.cast(example["det_classes"], tf.int64)
    scores = tf.ones_like(classes, tf.float32)
    out["det_boxes"], out["det_classes"] = augment.augment_boxes(
        boxes, classes, scores, window, flip, options)
    crowd = tf.cast(example.get("det_crowd", tf.zeros_like(classes)), tf.int64)
    out["det_crowd"] = augment.augment_boxes(boxes, crowd, scores, window, flip, options)[1] > 0
    out["det_mask"] = tf.constant(1.0)
  return out


def _in_memory(arrays: Mapping[str, np.ndarray]) -> Callable:
  def make(options):
    return tf.data.Dataset.from_tensor_slices(dict(arrays)).map(
        lambda example: preprocess(example, options))
  return make


# ---------------------------------------------------------------------------------------------
# The toy world.


def dominant_object(scene) -> int | None:
  """Index of the visible object covering the most pixels (None for an empty room)."""
  if not scene.visible:
    return None
  counts = np.bincount(scene.instances[scene.instances >= 0], minlength=len(scene.objects))
  return max(scene.visible, key=lambda i: counts[i])


def toyworld_scenes(num_examples: int, seed: int, size: int):
  """The first `num_examples` scenes of toy world `seed` that show an object."""
  found, index = [], 0
  while len(found) < num_examples:
    if index > 4 * num_examples + 100:
      raise RuntimeError(f"toy world seed {seed}: too many empty scenes")
    scene = toyworld.render_scene(seed, index, size)
    if dominant_object(scene) is not None:
      found.append(scene)
    index += 1
  return found


def toyworld_classification(num_examples: int, seed: int, size: int,
                            label: str = "object") -> EvalSplit:
  scenes = toyworld_scenes(num_examples, seed, size)
  names = TOYWORLD_LABELS[label]
  labels = []
  for scene in scenes:
    obj = scene.objects[dominant_object(scene)]
    labels.append(names.index({"object": f"{obj.colour} {obj.shape}", "colour": obj.colour,
                               "shape": obj.shape}[label]))
  arrays = {"image": np.stack([s.image for s in scenes]), "label": np.array(labels, np.int32)}
  return EvalSplit(f"toyworld classification by {label} (seed {seed}, {num_examples} images)",
                   frozenset({"label"}), {"label": names}, None, _in_memory(arrays))


def scene_captions(scene, seed: int, index: int, count: int) -> list[str]:
  """The scene's own caption and `count - 1` more from the same grammar and facts."""
  facts = toyworld.caption_facts(scene.objects, scene.visible, scene.instances, scene.camera)
  more = [toyworld.make_caption(np.random.default_rng([seed, index, k]), facts, scene.room)
          for k in range(1, count)]
  return [scene.caption, *more]


def toyworld_retrieval(num_examples: int, seed: int, size: int,
                       captions_per_image: int) -> EvalSplit:
  scenes = toyworld_scenes(num_examples, seed, size)
  captions = [scene_captions(s, seed, toyworld.parse_key(s.key)[1], captions_per_image)
              for s in scenes]
  arrays = {"image": np.stack([s.image for s in scenes]), "captions": np.array(captions)}
  return EvalSplit(f"toyworld retrieval (seed {seed}, {num_examples} images x "
                   f"{captions_per_image} captions)", frozenset({"captions"}), {}, None,
                   _in_memory(arrays))


def toyworld_dense(config, workdir: str, where: str) -> EvalSplit:
  """Toy-world shards on `seed`, written once under `<workdir>/eval_data/`, read as shards."""
  name = f"toyworld-{config.split}-s{config.seed}-n{config.num_examples}-{config.size}px"
  directory = prepare.resolve_path(os.path.join("eval_data", name), workdir)
  num_shards = max(1, min(4, int(config.num_examples) // 64))
  write = lambda: toyworld.write_dataset(
      directory, int(config.num_examples), seed=int(config.seed), size=int(config.size),
      num_shards=num_shards, split=str(config.split), verbose=False)
  split = shards_split(directory, where, manifest=dict(tasks=toyworld.manifest_tasks(config.size)))

  def make(options):
    if jax.process_index() == 0:
      write()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"eval toyworld {name}")
    return _shards_dataset(directory, sorted(split.fields - {"captions"}), options)

  split.make_dataset = make
  return split


# ---------------------------------------------------------------------------------------------
# Our own shards.


def _shards_dataset(directory: str, tasks, options):
  seed = tf.constant([0, 0], tf.int64)  # unused: eval crops are central and unflipped

  def decode(serialized):
    out = loader.decode_and_augment(serialized, seed, tasks, options, train=False)
    out["captions"] = out.pop("text")[None]
    del out["key"]
    return out
  return tf.data.TFRecordDataset(shards.shard_paths(directory)).map(
      decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def shards_split(directory: str, where: str, manifest: Mapping | None = None) -> EvalSplit:
  """Pseudo-labelled shards: their tasks from the manifest, and one caption per image."""
  if manifest is None:
    if not storage.exists(storage.join(directory, shards.MANIFEST_NAME)):
      raise cli.UserError(f"{where}.directory: {directory} has no {shards.MANIFEST_NAME}; expected "
                          "a directory of pseudo-labelled shards (tools/pseudo_label.py)")
    manifest = shards.read_manifest(directory)
  tasks = {name: entry for name, entry in manifest["tasks"].items() if name in FIELDS}
  classes = {name: tuple(entry["classes"]) for name, entry in tasks.items()
             if entry.get("classes")}
  depth_kind = tasks.get("depth", {}).get("depth_kind")
  return EvalSplit(f"shards {directory}", frozenset({"captions", *tasks}), classes, depth_kind,
                   lambda options: _shards_dataset(directory, sorted(tasks), options))


# ---------------------------------------------------------------------------------------------
# TFDS.


def _classification(example):
  return {"image": example["image"], "label": example["label"]}


def _detection(example):
  objects = example["objects"]
  out = {"image": example["image"], "det_boxes": objects["bbox"], "det_classes": objects["label"]}
  if "is_crowd" in objects:
    out["det_crowd"] = objects["is_crowd"]
  return out


def _captions(example, count: int = 5):
  return {"image": example["image"], "captions": example["captions"]["text"][:count]}


def _depth(example):
  return {"image": example["image"], "depth": example["depth"]}


def _ade20k(example):
  classes = tf.cast(example["annotation"][..., 0], tf.int32) - 1  # 0 = "other": ignored
  return {"image": example["image"], "seg": classes}


# TFDS name (before any "/config") -> (fields, adapter, where its class names are in the info).
TFDS_ADAPTERS = {
    "imagenet2012": (("label",), _classification, ("label",)),
    "imagenet_v2": (("label",), _classification, ("label",)),
    "places365_small": (("label",), _classification, ("label",)),
    "coco": (("det",), _detection, ("objects", "label")),
    "voc": (("det",), _detection, ("objects", "label")),
    "coco_captions": (("captions",), _captions, None),
    "nyu_depth_v2": (("depth",), _depth, None),
    "scene_parse150": (("seg",), _ade20k, None),  # ADE20K's 150 classes
}


def _tfds_class_names(info, path):
  feature = info.features
  for key in path:
    feature = feature[key]
  return tuple(feature.names)


def tfds_split(config, where: str) -> EvalSplit:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  name = str(config.name)
  base = name.split("/")[0].split(":")[0]
  if base not in TFDS_ADAPTERS:
    raise cli.UserError(f"{where}.name: no adapter for TFDS dataset {name!r}; known: "
                        f"{sorted(TFDS_ADAPTERS)} (add one to TFDS_ADAPTERS in {__file__})")
  fields, adapter, class_path = TFDS_ADAPTERS[base]
  data_dir = os.path.expanduser(config.data_dir) if config.get("data_dir") else None
  builder = tfds.builder(name, data_dir=data_dir)
  classes = {fields[0]: _tfds_class_names(builder.info, class_path)} if class_path else {}
  depth_kind = "metric" if "depth" in fields else None

  def make(options):
    dataset = builder.as_dataset(split=str(config.split), shuffle_files=False)
    return dataset.map(lambda ex: preprocess(adapter(ex), options))
  return EvalSplit(f"tfds:{name}/{config.split} ({data_dir or 'default data_dir'})",
                   frozenset(fields), classes, depth_kind, make)


# ---------------------------------------------------------------------------------------------
# From a config.

_DEFAULTS = {
    "toyworld": dict(source="toyworld", kind="classification", num_examples=256, seed=1001,
                     size=64, captions_per_image=5, split="val", label="object"),
    "shards": dict(source="shards", directory=""),
    "tfds": dict(source="tfds", name="", split="validation", data_dir=""),
}


def _config_with_defaults(config, where: str):
  import ml_collections  # pylint: disable=import-outside-toplevel
  given = dict(config.to_dict() if hasattr(config, "to_dict") else config or {})
  source = given.get("source", "toyworld")
  if source not in SOURCES:
    raise cli.UserError(f"{where}.source: expected one of {list(SOURCES)}, found {source!r}")
  unknown = sorted(set(given) - set(_DEFAULTS[source]))
  if unknown:
    raise cli.UserError(f"{where}: unknown keys {unknown} for source {source!r}; expected "
                        f"{sorted(_DEFAULTS[source])}")
  return ml_collections.ConfigDict({**_DEFAULTS[source], **given})


def from_config(config, workdir: str, where: str) -> EvalSplit:
  """The EvalSplit of an evaluator's `dataset` config (`where` names it in errors)."""
  config = _config_with_defaults(config, where)
  if config.source == "shards":
    if not config.directory:
      raise cli.UserError(f"{where}.directory: required for source 'shards'")
    return shards_split(prepare.resolve_path(config.directory, workdir), where)
  if config.source == "tfds":
    if not config.name:
      raise cli.UserError(f"{where}.name: required for source 'tfds' (e.g. 'imagenet2012')")
    return tfds_split(config, where)
  if config.kind not in TOYWORLD_KINDS:
    raise cli.UserError(f"{where}.kind: expected one of {list(TOYWORLD_KINDS)}, found "
                        f"{config.kind!r}")
  if config.kind == "dense":
    return toyworld_dense(config, workdir, where)
  if config.label not in TOYWORLD_LABELS:
    raise cli.UserError(f"{where}.label: expected one of {list(TOYWORLD_LABELS)}, found "
                        f"{config.label!r}")
  return _lazy(config)


def _lazy(config) -> EvalSplit:
  """Toy classification / retrieval splits, rendered on first read (fields known now)."""
  n, seed, size = int(config.num_examples), int(config.seed), int(config.size)
  if config.kind == "classification":
    fields, classes = frozenset({"label"}), {"label": TOYWORLD_LABELS[config.label]}
    render = lambda: toyworld_classification(n, seed, size, config.label)
  else:
    fields, classes = frozenset({"captions"}), {}
    render = lambda: toyworld_retrieval(n, seed, size, int(config.captions_per_image))
  cache = {}

  def make(options):
    if "split" not in cache:
      cache["split"] = render()
    return cache["split"].make_dataset(options)
  return EvalSplit(f"toyworld {config.kind} (seed {seed}, {n} images)", fields, classes, None,
                   make)
