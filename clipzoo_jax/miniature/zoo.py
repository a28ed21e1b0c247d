"""The toy world's model zoo: small experts of real Hugging Face architectures (SegFormer, Depth
Anything, RT-DETR) trained on labelled toy-world scenes and saved with `save_pretrained`, exactly as
a user's downloaded experts sit on disk (issue 15).

Why train rather than use the renderer's ground truth: the paper's effect comes from imperfect
experts whose errors the student partly averages out. These experts learned from data and err on
held-out scenes the way real ones do, and they load through the same expert classes and the same
folder layout as production weights, so pseudo-labelling the toy corpus runs the real path
(`configs/pseudo_label/demo_zoo.py`). Normals come from the geometric depth-to-normals expert on the
trained depth expert: nothing to train, but its error is reported too.

Toy-world seeds: the training split is 2000 + seed, the held-out report split 2100 + seed (1001-1004
are the evaluation splits, 3000+ the corpus). `zoo.json` records the settings, each expert
(architecture, parameters, steps, seconds) and its held-out metrics next to those of a random-init
model of the same architecture; a rerun with the same settings skips what is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from clipzoo_jax import atomic_files, cli, progress
from clipzoo_jax.data import records, toyworld

ZOO_FILE = "zoo.json"
IMAGE_SIZE = 64
TRAIN_SEED_BASE = 2000
HELDOUT_SEED_BASE = 2100
MAX_DEPTH = 12  # metres; the toy world's farthest wall is ~10 m away
FOV_DEGREES = 57.5  # the toy world's cameras have 50-65 degrees; the normals expert assumes one
DET_THRESHOLD = 0.3
PROGRESS_EVERY_S = 3.0


class ZooError(cli.UserError):
  """The zoo directory cannot be used as asked (built with other settings)."""


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How much work one build does: scenes rendered and optimizer steps per expert folder."""
  train_scenes: int
  heldout_scenes: int
  steps: Mapping[str, int]


# "test" is a private knob for the test suite: seconds-long, still clearly better than untrained.
SIZES = {
    "full": Sizes(1024, 64, {"segformer": 600, "depth_anything": 500, "rtdetr": 1000}),
    "quick": Sizes(256, 32, {"segformer": 120, "depth_anything": 120, "rtdetr": 180}),
    "test": Sizes(128, 16, {"segformer": 40, "depth_anything": 100, "rtdetr": 60}),
}


# ---------------------------------------------------------------------------------------------
# The three trained experts: architecture, targets and loss of each.


def _segformer(seed: int):
  from clipzoo_jax.experts import tiny
  return tiny.segformer_model(len(toyworld.SEG_CLASSES), IMAGE_SIZE, hidden_sizes=(16, 32, 64),
                              depths=(1, 1, 1), decoder=32, num_attention_heads=(1, 2, 4),
                              class_names=toyworld.SEG_CLASSES, seed=seed)


def _depth_anything(seed: int):
  """Metric Depth Anything (sigmoid head times MAX_DEPTH): hf_depth reads it as metric depth from
  its config, so the depth-to-normals expert gets true geometry rather than shifted disparity."""
  from clipzoo_jax.experts import tiny
  return tiny.depth_anything_model(IMAGE_SIZE, hidden=32, patch_size=16, max_depth=MAX_DEPTH,
                                   seed=seed)


def _rtdetr(seed: int):
  from clipzoo_jax.experts import tiny
  return tiny.rtdetr_model(len(toyworld.DET_CLASSES), IMAGE_SIZE, width=16, decoder_layers=2,
                           num_queries=20, class_names=toyworld.DET_CLASSES, seed=seed)


def _seg_loss(model, pixels, scenes):
  import torch
  target = torch.as_tensor(np.stack([s.labels.seg for s in scenes])).long()
  return model(pixel_values=pixels, labels=target).loss


def _depth_loss(model, pixels, scenes):
  """Mean absolute log error: relative, like AbsRel, and well-behaved near the sigmoid's ends."""
  import torch
  target = torch.as_tensor(np.stack([s.labels.depth for s in scenes]))
  pred = model(pixel_values=pixels).predicted_depth
  return (pred.clamp_min(1e-3).log() - target.log()).abs().mean()


def detr_target(labels: records.Labels) -> dict:
  """Normalized (ymin, xmin, ymax, xmax) boxes -> the DETR family's (cx, cy, w, h) targets."""
  import torch
  ymin, xmin, ymax, xmax = np.asarray(labels.det_boxes, np.float32).reshape(-1, 4).T
  boxes = np.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], axis=-1)
  return {"class_labels": torch.as_tensor(labels.det_classes).long().reshape(-1),
          "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)}


def _det_loss(model, pixels, scenes):
  # The model's own Hungarian-matched loss (classification, L1 and GIoU, auxiliary layers).
  return model(pixel_values=pixels, labels=[detr_target(s.labels) for s in scenes]).loss


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str            # folder under the zoo directory
  task: str
  architecture: str
  build: Callable      # seed -> (model, image processor), random init
  loss: Callable       # (model, pixel_values, scenes) -> scalar loss
  batch_size: int
  learning_rate: float


RECIPES = (
    Recipe("segformer", "seg", "SegFormer (MiT 16-32-64)", _segformer, _seg_loss, 16, 5e-3),
    Recipe("depth_anything", "depth", "Depth Anything, metric (DINOv2 4x32, patch 16)",
           _depth_anything, _depth_loss, 16, 2e-3),
    Recipe("rtdetr", "det", "RT-DETR (ResNet 16-64, 2 decoder layers)", _rtdetr, _det_loss, 16,
           2e-3),
)
FOLDERS = {recipe.task: recipe.name for recipe in RECIPES}
NORMALS_ARCHITECTURE = "geometric depth-to-normals on depth_anything"


# ---------------------------------------------------------------------------------------------
# Expert configs: the one place the demo zoo's pseudo-labelling experts are described.


def expert_configs(zoo_dir: str, tasks: Sequence[str] = ("seg", "depth", "normals", "det"),
                   device: str = "cpu", dtype: str = "float32",
                   det_threshold: float = DET_THRESHOLD, fov_degrees: float = FOV_DEGREES,
                   label_scale: float = 1.0) -> dict:
  """`config.experts` for the zoo in `zoo_dir`: plain dicts with every option of each kind
  (None = the kind's default), as `configs/pseudo_label/demo_zoo.py` and the held-out report use."""
  unknown = sorted(set(tasks) - {"seg", "depth", "normals", "det"})
  if unknown or not tasks:
    raise ZooError(f"demo zoo tasks: expected some of seg, depth, normals, det; "
                   f"found {list(tasks)}")
  dense = {"label_scale": label_scale, "label_max_side": None}
  model = lambda task: {"source": os.path.join(zoo_dir, FOLDERS[task]), "device": device,
                        "dtype": dtype}
  experts = {}
  if "depth" in tasks or "normals" in tasks:
    depth = {"kind": "hf_depth", **model("depth"), **dense, "depth_kind": None}
  if "depth" in tasks:
    experts["depth"] = depth
  if "seg" in tasks:
    experts["seg"] = {"kind": "hf_semantic", **model("seg"), **dense}
  if "det" in tasks:
    experts["det"] = {"kind": "hf_detection", **model("det"), "threshold": det_threshold,
                      "max_detections": 100}
  if "normals" in tasks:
    experts["normals"] = {"kind": "depth_normals", "fov_degrees": fov_degrees, **dense}
    if "depth" in tasks:
      experts["normals"]["from_task"] = "depth"  # reuse the job's depth: no second forward pass
    else:
      experts["normals"]["depth"] = depth
  return experts


# ---------------------------------------------------------------------------------------------
# Training.


def render_split(seed: int, count: int) -> list[toyworld.Scene]:
  return [toyworld.render_scene(seed, index, IMAGE_SIZE) for index in range(count)]


def pixel_values(processor, scenes: Sequence[toyworld.Scene]):
  """The processor's own preprocessing, as the expert applies it at labelling time."""
  return processor(images=[s.image for s in scenes], return_tensors="pt",
                   input_data_format="channels_last")["pixel_values"]


def _learning_rate(step: int, total: int, peak: float) -> float:
  """Linear warmup over the first 10% of steps, then cosine decay to 0."""
  warmup = max(1, total // 10)
  if step < warmup:
    return peak * (step + 1) / warmup
  return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def train(recipe: Recipe, model, pixels, scenes, steps: int, seed: int, log) -> dict:
  """AdamW on CPU over shuffled epochs of `scenes`; progress lines every PROGRESS_EVERY_S."""
  import torch
  optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=1e-4)
  rng = np.random.default_rng(seed)
  order, start, last_log = np.zeros(0, np.int64), time.perf_counter(), time.perf_counter()
  first_loss = None
  model.train()
  for step in range(steps):
    if len(order) < recipe.batch_size:
      order = rng.permutation(len(scenes))
    batch, order = order[:recipe.batch_size], order[recipe.batch_size:]
    for group in optimizer.param_groups:
      group["lr"] = _learning_rate(step, steps, recipe.learning_rate)
    loss = recipe.loss(model, pixels[batch], [scenes[i] for i in batch])
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    first_loss = float(loss.item()) if first_loss is None else first_loss
    now = time.perf_counter()
    if now - last_log >= PROGRESS_EVERY_S or step + 1 == steps:
      rate = progress.throughput(step + 1, now - start)
      log(f"  {recipe.name}: step {step + 1}/{steps} loss {loss.item():.4f} {rate:.1f} steps/s "
          f"ETA {progress.format_eta(progress.seconds_left(steps - step - 1, rate))}")
      last_log = now
  model.eval()
  return {"first_loss": first_loss, "final_loss": float(loss.item()),
          "seconds": round(time.perf_counter() - start, 1)}


def save_atomically(model, processor, folder: str) -> None:
  """`save_pretrained` into a temporary folder beside `folder`, then one rename: a reader (or a
  resumed build) finds no folder or a complete one."""
  temporary = atomic_files.temp_path(folder)
  model.save_pretrained(temporary)
  processor.save_pretrained(temporary)
  if os.path.isdir(folder):  # left by a build killed before it recorded the folder in zoo.json
    shutil.rmtree(folder)
  os.replace(temporary, folder)


def num_parameters(model) -> int:
  return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------------------
# Held-out report: the saved folders through the pseudo-labelling job's own expert classes.


def label_scenes(configs: Mapping, scenes: Sequence[toyworld.Scene],
                 batch_size: int = 16) -> list[records.Labels]:
  """Labels of `scenes` from experts built from `configs`, batched as the job batches them."""
  from clipzoo_jax.experts import base
  from clipzoo_jax.pseudo_label import job
  experts = base.build_experts(configs)
  labels = []
  for begin in range(0, len(scenes), batch_size):
    decoded = [job.Decoded(s.key, b"", s.caption, s.image,
                           {task: e.prepare(s.image, s.key) for task, e in experts.items()})
               for s in scenes[begin:begin + batch_size]]
    labels += job.label_batch(experts, decoded)
  return labels


# Reported metric name -> the key of its accumulator's result, per task.
REPORTED = {"seg": {"miou": "miou", "pixel_accuracy": "pixel_accuracy"},
            "depth": {"abs_rel": "abs_rel", "delta1": "delta1"},
            "normals": {"mean_angle_deg": "mean"}, "det": {"ap50": "ap50", "ap": "ap"}}


def _accumulators() -> dict:
  """Per task: a metrics accumulator and how one (prediction, truth) pair of Labels updates it."""
  from clipzoo_jax.evals import metrics
  dense = lambda field: lambda acc, pred, truth: acc.update(getattr(pred, field)[None],
                                                           getattr(truth, field)[None])
  boxes = lambda acc, pred, truth: acc.update(pred.det_boxes, pred.det_scores, pred.det_classes,
                                              truth.det_boxes, truth.det_classes)
  return {"seg": (metrics.ConfusionMatrix(len(toyworld.SEG_CLASSES)), dense("seg")),
          "depth": (metrics.DepthMetrics(), dense("depth")),
          "normals": (metrics.NormalsMetrics(), dense("normals")),
          "det": (metrics.DetectionAP(len(toyworld.DET_CLASSES)), boxes)}


def heldout_metrics(predicted: Sequence[records.Labels], scenes: Sequence[toyworld.Scene],
                    tasks: Sequence[str]) -> dict:
  """Per task, the metrics a reader compares experts by (REPORTED), against the renderer's ground
  truth, with evals.metrics' conventions (depth pooled over pixels, COCO AP)."""
  accumulators = {task: acc for task, acc in _accumulators().items() if task in tasks}
  for pred, scene in zip(predicted, scenes):
    for accumulator, update in accumulators.values():
      update(accumulator, pred, scene.labels)
  report = {}
  for task, (accumulator, _) in accumulators.items():
    result = accumulator.result()
    report[task] = {name: round(result[key], 4) for name, key in REPORTED[task].items()}
  return report


def _untrained_metrics(seed: int, scenes, log) -> dict:
  """The same report for random-init models of the same architectures (saved to a temp dir)."""
  with tempfile.TemporaryDirectory(prefix="untrained_zoo_") as folder:
    for recipe in RECIPES:
      model, processor = recipe.build(seed)
      save_atomically(model.eval(), processor, os.path.join(folder, recipe.name))
    log("held-out report: untrained experts")
    tasks = ("seg", "depth", "normals", "det")
    return heldout_metrics(label_scenes(expert_configs(folder), scenes), scenes, tasks)


# ---------------------------------------------------------------------------------------------
# The build: settings check, resumable experts, report.


def _settings(quick: bool, seed: int, sizes: str) -> dict:
  chosen = SIZES[sizes]
  return {"quick": quick, "seed": seed, "sizes": sizes, "image_size": IMAGE_SIZE,
          "train_scenes": chosen.train_scenes, "heldout_scenes": chosen.heldout_scenes,
          "steps": dict(chosen.steps)}


def _load_zoo(out_dir: str, settings: dict) -> dict:
  """zoo.json of `out_dir`, refusing one built with other settings; a fresh one if absent."""
  path = os.path.join(out_dir, ZOO_FILE)
  if not os.path.exists(path):
    return {"settings": settings, "experts": {}}
  with open(path) as f:
    zoo = json.load(f)
  found = zoo.get("settings", {})
  differ = [key for key in settings if found.get(key) != settings[key]]
  # Name what the user chose (--quick, --seed); the sizes derived from it only when those match.
  differ = [key for key in differ if key in ("quick", "seed")] or differ
  if differ:
    was = ", ".join(f"{key}={found.get(key)!r}" for key in differ)
    now = ", ".join(f"{key}={settings[key]!r}" for key in differ)
    raise ZooError(f"{path}: this zoo was built with {was}, this run asks for {now}; "
                   f"pass another --out or delete {out_dir}")
  return zoo


def _remove_debris(out_dir: str) -> None:
  """Temporary folders of a build that was killed while saving."""
  for name in os.listdir(out_dir):
    if atomic_files.is_temp(name):
      shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def _build_expert(recipe: Recipe, out_dir: str, settings: dict, train_scenes, log) -> dict:
  steps, seed = settings["steps"][recipe.name], settings["seed"]
  log(f"{recipe.name} ({recipe.task}): training {recipe.architecture} for {steps} steps")
  model, processor = recipe.build(seed)
  pixels = pixel_values(processor, train_scenes)
  trained = train(recipe, model, pixels, train_scenes, steps, seed, log)
  save_atomically(model, processor, os.path.join(out_dir, recipe.name))
  return {"task": recipe.task, "architecture": recipe.architecture,
          "params": num_parameters(model), "train_steps": steps, **trained}


@contextlib.contextmanager
def one_torch_thread():
  """Models this small run faster on one intra-op thread: on 2 busy cores, two threads took
  0.6-0.9 s per training step where one took 30-70 ms (they wait on each other more than they
  compute). The caller's setting is restored afterwards."""
  import torch
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(before)


def build_zoo(out_dir: str, quick: bool = False, seed: int = 0, log=print,
              _sizes: str | None = None) -> dict:
  """Trains (or resumes) the zoo in `out_dir` and returns its zoo.json contents, held-out report
  included. `_sizes` ("test") is the test suite's smaller build; by default quick picks "quick"."""
  with one_torch_thread():
    return _build_zoo(out_dir, quick, seed, log, _sizes or ("quick" if quick else "full"))


def _build_zoo(out_dir: str, quick: bool, seed: int, log, sizes: str) -> dict:
  settings = _settings(quick, seed, sizes)
  os.makedirs(out_dir, exist_ok=True)
  zoo = _load_zoo(out_dir, settings)
  _remove_debris(out_dir)
  zoo_path = os.path.join(out_dir, ZOO_FILE)
  atomic_files.write_json(zoo_path, zoo, indent=1)
  todo = [r for r in RECIPES if r.name not in zoo["experts"]
          or not os.path.isdir(os.path.join(out_dir, r.name))]
  for recipe in RECIPES:
    if recipe not in todo:
      log(f"{recipe.name}: already built ({zoo['experts'][recipe.name]['train_steps']} steps); "
          "skipping")
  if todo:
    log(f"rendering {settings['train_scenes']} training scenes (toy-world seed "
        f"{TRAIN_SEED_BASE + seed})")
    train_scenes = render_split(TRAIN_SEED_BASE + seed, settings["train_scenes"])
    for recipe in todo:
      zoo["experts"][recipe.name] = _build_expert(recipe, out_dir, settings, train_scenes, log)
      zoo.pop("report", None)  # stale once any expert changed
      atomic_files.write_json(zoo_path, zoo, indent=1)
  if "report" not in zoo:
    zoo["report"] = _report(out_dir, settings, log)
    atomic_files.write_json(zoo_path, zoo, indent=1)
  else:
    log("held-out report: up to date; skipping")
  return zoo


def _report(out_dir: str, settings: dict, log) -> dict:
  scenes = render_split(HELDOUT_SEED_BASE + settings["seed"], settings["heldout_scenes"])
  log(f"held-out report: {len(scenes)} scenes (toy-world seed "
      f"{HELDOUT_SEED_BASE + settings['seed']}), trained experts")
  tasks = ("seg", "depth", "normals", "det")
  trained = heldout_metrics(label_scenes(expert_configs(out_dir), scenes), scenes, tasks)
  untrained = _untrained_metrics(settings["seed"], scenes, log)
  return {task: {"expert": FOLDERS.get(task, "normals (from depth_anything)"),
                 "trained": trained[task], "untrained": untrained[task]} for task in tasks}


# ---------------------------------------------------------------------------------------------
# The report as a table.

LOWER_IS_BETTER = ("abs_rel", "mean_angle_deg")


def report_table(zoo: Mapping) -> str:
  """Markdown: one row per held-out metric, the trained expert next to its untrained twin."""
  rows = ["| task | expert | architecture | params | steps | train s | metric | trained | "
          "untrained |", "|---|---|---|---:|---:|---:|---|---:|---:|"]
  for task, entry in zoo["report"].items():
    built = zoo["experts"].get(FOLDERS.get(task, ""), {})
    architecture = built.get("architecture", NORMALS_ARCHITECTURE)
    for metric, value in entry["trained"].items():
      arrow = "lower" if metric in LOWER_IS_BETTER else "higher"
      rows.append(f"| {task} | {entry['expert']} | {architecture} | {built.get('params', 0):,} | "
                  f"{built.get('train_steps', 0)} | {built.get('seconds', 0)} | {metric} "
                  f"({arrow} is better) | {value:.3f} | {entry['untrained'][metric]:.3f} |")
  return "\n".join(rows)
