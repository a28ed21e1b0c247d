"""Dense probes on the frozen image encoder, the paper's protocol: a probe is trained on the
encoder's patch features (computed under jit, never updated) with the task's own loss, then
evaluated on a held-out split.

`head` picks the probe: `linear` (LayerNorm + one linear map per patch, bilinearly upsampled to
the label size), `light` (the same light conv/upsample head the model trains, `models.heads`),
or `model` (no probe: the model's own task head, to see what pseudo-supervision taught it). The
recipe (steps, learning_rate, weight_decay, train_batch_size, hidden, upsample, label_size,
depth_loss, seed) comes from the config. Probe training runs on the run's mesh: batch sharded,
probe replicated, one jitted step (optax AdamW, cosine decay).

Metrics: seg mIoU / pixel accuracy / mean class accuracy; depth AbsRel, RMSE, delta1..3 (a
scale-and-shift-invariant probe, `depth_loss=ssi`, is aligned per image by least squares first;
`silog` predicts log depth); normals angular errors; det box AP, AP50, AP75 from CenterNet peaks.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clipzoo_jax import cli
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.evals import base, det_decode, metrics
from clipzoo_jax.evals.predict import pad_batch, to_device
from clipzoo_jax.models import heads as heads_lib

TASKS = ("seg", "depth", "normals", "det")
HEADS = ("linear", "light", "model")
DEFAULT_TRAIN_DATASET = dict(source="toyworld", kind="dense", seed=1003, num_examples=256,
                             split="probe_train")
DEFAULT_DATASET = dict(source="toyworld", kind="dense", seed=1004, num_examples=128, split="val")


def _resize(x, size: int):
  if x.shape[1] == size and x.shape[2] == size:
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")


class LinearProbe(nn.Module):
  """LayerNorm + a linear map of each patch feature to all of the task's channels; each head's
  channels start at its spec's bias (a detection heatmap at CenterNet's prior, as the model's
  heads do, rather than at probability 0.5 on every pixel)."""
  specs: tuple
  label_size: int

  @nn.compact
  def __call__(self, grid):
    channels = sum(spec.channels for spec in self.specs)
    bias = jnp.concatenate([jnp.full((spec.channels,), spec.bias_init, jnp.float32)
                            for spec in self.specs])
    dense = nn.Dense(channels, bias_init=lambda *_: bias)
    raw = _resize(dense(nn.LayerNorm()(grid)), self.label_size)
    out, start = {}, 0
    for spec in self.specs:
      out.update(heads_lib.slice_outputs(raw[..., start:start + spec.channels], spec))
      start += spec.channels
    return out


class LightProbe(nn.Module):
  """The model's light head architecture (LayerNorm, conv, x2 upsample + conv stages)."""
  specs: tuple
  label_size: int
  hidden: int
  upsample: int

  @nn.compact
  def __call__(self, grid):
    out = {}
    for spec in self.specs:
      raw = heads_lib.UpsampleHead(spec.channels, self.hidden, self.upsample, spec.bias_init,
                                   name=spec.name)(grid)
      out.update(heads_lib.slice_outputs(_resize(raw, self.label_size), spec))
    return out


@base.register("dense_probe")
class DenseProbe(base.Evaluator):
  DEFAULT_DATASET = DEFAULT_DATASET
  OPTIONS = dict(task="seg", head="linear", steps=200, learning_rate=3e-3, weight_decay=1e-4,
                 train_batch_size=0, hidden=64, upsample=4, label_size=0, depth_loss="ssi",
                 seed=0, max_detections=50, train_dataset=None, cache_features=False,
                 save_examples=0)

  def __init__(self, name, config, context):
    where = f"config.evals.{name}"
    task = config.get("task", "seg")
    if task not in TASKS:
      raise cli.UserError(f"{where}.task: expected one of {list(TASKS)}, found {task!r}")
    self.needs = (task,)
    super().__init__(name, config, context)
    self.task = task_lib.get(task)
    self._check_recipe()
    run_config = context.run.config
    self.label_size = int(self.options.label_size or run_config.data.label_size)
    if self.options.head == "model":
      self.train_split = None
      self._check_model_head()
    else:
      train_config = self.options.train_dataset or DEFAULT_TRAIN_DATASET
      self.train_split = self.build_dataset(train_config, f"{self.where}.train_dataset")
    self.model_config = self._model_config()
    self._compiled = None

  def _check_recipe(self) -> None:
    options = self.options
    if options.head not in HEADS:
      raise cli.UserError(f"{self.where}.head: expected one of {list(HEADS)}, found "
                          f"{options.head!r}")
    if options.depth_loss not in ("ssi", "silog"):
      raise cli.UserError(f"{self.where}.depth_loss: expected 'ssi' or 'silog', found "
                          f"{options.depth_loss!r}")
    if options.head != "model" and int(options.steps) < 1:
      raise cli.UserError(f"{self.where}.steps: expected >= 1 probe training steps, found "
                          f"{options.steps}")

  def _check_model_head(self) -> None:
    model_tasks = list(self.context.run.config.model.heads.tasks)
    if self.task.name not in model_tasks:
      raise cli.UserError(f"{self.where}: head 'model' evaluates the model's own "
                          f"{self.task.name!r} head, but config.model.heads.tasks is {model_tasks}")
    if self.label_size != int(self.context.run.config.data.label_size):
      raise cli.UserError(f"{self.where}.label_size {self.label_size}: head 'model' outputs "
                          f"config.data.label_size {self.context.run.config.data.label_size}")

  def _model_config(self):
    """The model config the probe's head layout comes from, with the dataset's class count."""
    model = ml_collections.ConfigDict(self.context.run.config.model.to_dict())
    split = self.train_split or self.dataset
    names = split.classes.get(self.task.name) if self.options.head != "model" else None
    if names and self.task.name == "seg":
      model.heads.num_seg_classes = len(names)
    if names and self.task.name == "det":
      model.heads.num_det_classes = len(names)
    return model

  # -- the probe -------------------------------------------------------------------------------

  def probe_module(self) -> nn.Module:
    specs = self.task.heads(self.model_config)
    if self.options.head == "linear":
      return LinearProbe(specs, self.label_size)
    return LightProbe(specs, self.label_size, int(self.options.hidden), int(self.options.upsample))

  def _optimizer(self):
    steps = int(self.options.steps)
    schedule = optax.cosine_decay_schedule(float(self.options.learning_rate), steps)
    return optax.adamw(schedule, weight_decay=float(self.options.weight_decay))

  def _compile(self, feature_shape):
    """(init, train step, predict) of the probe, jitted on the run's mesh once."""
    predict = self.context.predict
    module, tx = self.probe_module(), self._optimizer()
    loss_config = {"depth": self.options.depth_loss}
    task = self.task

    def init(rng):
      params = nn.unbox(module.init(rng, jnp.zeros((1, *feature_shape[1:]))))["params"]
      return params, tx.init(params)

    def train_step(params, opt_state, features, batch):
      loss_fn = lambda p: task.loss(module.apply({"params": p}, features), batch, loss_config)
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    replicated, batch = predict.replicated, predict.batch_sharding
    return (jax.jit(init, out_shardings=replicated),
            jax.jit(train_step, in_shardings=(replicated, replicated, batch, batch),
                    out_shardings=replicated, donate_argnums=(0, 1)),
            jax.jit(lambda p, f: module.apply({"params": p}, f), in_shardings=(replicated, batch),
                    out_shardings=replicated))

  def _label_fields(self, batch) -> dict:
    names = self.task.batch_fields(self.label_size, 1, self.model_config)  # names only
    return {name: batch[name] for name in names}

  def train_probe(self, params):
    """The probe's parameters after `steps` steps on the frozen encoder's features, and the
    mean loss of the last tenth of the steps."""
    predict, steps = self.context.predict, int(self.options.steps)
    batch_size = int(self.options.train_batch_size or self.batch_size)
    if self.options.cache_features:
      stream = self._cached_batches(params, batch_size)
    else:
      stream = ((predict("patch_features", params, batch["image"]), batch)
                for batch in self.train_split.batches(self.augment_options(self.label_size),
                                                      batch_size, repeat=True,
                                                      seed=int(self.options.seed)))
    losses = []
    with self.context.run.activation_context():
      for step in range(steps):
        features, batch = next(stream)
        if self._compiled is None:
          self._compiled = self._compile(features.shape)
        init, train_step, _ = self._compiled
        if step == 0:
          probe, opt_state = init(jax.random.PRNGKey(int(self.options.seed)))
        labels = {k: to_device(v, predict.batch_sharding)
                  for k, v in self._label_fields(batch).items()}
        probe, opt_state, loss = train_step(probe, opt_state, features, labels)
        losses.append(loss)
    tail = losses[-max(1, steps // 10):]
    return probe, float(np.mean(jax.device_get(tail)))

  def _cached_batches(self, params, batch_size: int):
    """(features, labels) batches drawn from the training split's features, computed once.

    Evaluation preprocessing is deterministic (central crops), so every pass over the split
    gives the encoder the same images: `cache_features=True` runs the encoder once per example
    instead of once per probe step (steps x batch). For splits whose features fit in host
    memory; each pass is a fresh permutation (seeded), full batches only."""
    if jax.process_count() > 1:
      raise cli.UserError(f"{self.where}.cache_features: single-process runs only (the cache "
                          "is gathered on one host)")
    predict = self.context.predict
    features, labels = [], []
    for batch in self.train_split.batches(self.augment_options(self.label_size), batch_size):
      padded, count = pad_batch(batch, batch_size)
      features.append(np.asarray(predict("patch_features", params, padded["image"]))[:count])
      labels.append(self._label_fields(batch))
    features = np.concatenate(features)
    labels = {k: np.concatenate([part[k] for part in labels]) for k in labels[0]}
    if len(features) < batch_size:
      raise cli.UserError(f"{self.where}: the probe's training split has {len(features)} "
                          f"examples, fewer than its batch size {batch_size}")
    rng = np.random.default_rng(int(self.options.seed))
    while True:
      order = rng.permutation(len(features))
      for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = np.sort(order[start:start + batch_size])
        yield (to_device(features[rows], predict.batch_sharding),
               {k: v[rows] for k, v in labels.items()})

  # -- evaluation ------------------------------------------------------------------------------

  def predictions(self, params, probe):
    """(host outputs, host batch) of each eval batch, padding rows dropped."""
    predict = self.context.predict
    options = self.augment_options(self.label_size)
    for batch in self.dataset.batches(options, self.batch_size):
      padded, count = pad_batch(batch, self.batch_size)
      if probe is None:
        outputs = predict("head_outputs", params, padded["image"])
      else:
        features = predict("patch_features", params, padded["image"])
        with self.context.run.activation_context():
          outputs = self._compiled[2](probe, features)
      host = {k: np.asarray(v)[:count] for k, v in outputs.items()}
      yield host, {k: v[:count] for k, v in padded.items()}

  def evaluate(self, params):
    probe, loss = (None, None) if self.options.head == "model" else self.train_probe(params)
    scorer = SCORERS[self.task.name](self)
    examples = []
    for outputs, batch in self.predictions(params, probe):
      scorer.update(outputs, batch)
      if sum(len(part["image"]) for part in examples) < int(self.options.save_examples):
        examples.append({"image": batch["image"], **{f"label/{k}": v for k, v in
                                                     self._label_fields(batch).items()},
                         **{f"prediction/{k}": v for k, v in outputs.items()}})
    if examples:
      self._save_examples(examples)
    if loss is not None:
      yield "probe_train_loss", loss
    yield from scorer.result().items()


  def _save_examples(self, parts) -> None:
    """`save_examples=N`: the first N eval images with their labels and the probe's outputs, as
    `<workdir>/probe_examples/<name>.npz` (the newest evaluation), for pictures."""
    import io  # pylint: disable=import-outside-toplevel
    from clipzoo_jax import storage  # pylint: disable=import-outside-toplevel
    count = int(self.options.save_examples)
    arrays = {k: np.concatenate([part[k] for part in parts])[:count] for k in parts[0]}
    if self.task.name == "seg":  # class ids, not logits
      arrays["prediction/seg"] = arrays["prediction/seg"].argmax(-1).astype(np.int32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    directory = storage.join(self.context.workdir, "probe_examples")
    storage.makedirs(directory)
    storage.write_bytes(storage.join(directory, f"{self.name}.npz"), buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Per-task scoring of host outputs against host labels (metric math in evals/metrics.py).


class SegScorer:
  def __init__(self, probe: DenseProbe):
    self.matrix = metrics.ConfusionMatrix(int(probe.model_config.heads.num_seg_classes))

  def update(self, outputs, batch):
    mask = batch["seg_mask"] > 0
    self.matrix.update(outputs["seg"].argmax(-1), batch["seg"], mask=mask)

  def result(self):
    result = self.matrix.result()
    return {key: result[key] for key in ("miou", "pixel_accuracy", "mean_class_accuracy")}


class DepthScorer:
  def __init__(self, probe: DenseProbe):
    self.kind = probe.options.depth_loss
    self.depth = metrics.DepthMetrics()

  def update(self, outputs, batch):
    pred, target = outputs["depth"].astype(np.float64), batch["depth"]
    valid = (target > 0) & np.isfinite(target)
    if self.kind == "ssi":
      pred = metrics.align_scale_shift(pred, target, valid)
    else:
      pred = np.exp(pred)
    self.depth.update(pred, target, valid=valid, mask=batch["depth_mask"] > 0)

  def result(self):
    return self.depth.result()


class NormalsScorer:
  def __init__(self, probe: DenseProbe):
    del probe
    self.normals = metrics.NormalsMetrics()

  def update(self, outputs, batch):
    self.normals.update(outputs["normals"], batch["normals"], mask=batch["normals_mask"] > 0)

  def result(self):
    return self.normals.result()


class DetScorer:
  def __init__(self, probe: DenseProbe):
    self.ap = metrics.DetectionAP(int(probe.model_config.heads.num_det_classes))
    self.max_detections = int(probe.options.max_detections)

  def update(self, outputs, batch):
    boxes, scores, classes = jax.device_get(_decode_boxes(
        outputs["det_heatmap"], outputs["det_size"], outputs["det_offset"], self.max_detections))
    self.ap.update_batch(boxes, scores, classes, batch["det_boxes"], batch["det_classes"],
                         pred_valid=scores > 0, gt_valid=batch["det_classes"] >= 0,
                         gt_crowd=batch.get("det_crowd"), mask=batch["det_mask"] > 0)

  def result(self):
    result = self.ap.result()
    return {key: result[key] for key in ("ap", "ap50", "ap75")}


_decode_boxes = jax.jit(det_decode.decode_boxes, static_argnums=3)
SCORERS = {"seg": SegScorer, "depth": DepthScorer, "normals": NormalsScorer, "det": DetScorer}
