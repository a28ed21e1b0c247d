"""One path from a config to a compiled, restorable run: `setup(config) -> Run`.

Every entry point builds its run here (training, evaluation, the AOT compile check, benchmarks,
checkpoint reading), from the config alone: the mesh and sharding rules, the model, optimizer and
schedule, the abstract state with its shardings and the abstract batch (shapes, dtypes and
shardings of the batch contract). Nothing here reads data or allocates the state, so

  run = setup(config)
  run.compile()            # == jit(train_step).lower(run.abstract_state, run.abstract_batch)

works with no data directory. `restore_or_init` restores a checkpoint straight into the sharded
abstract state, and initialises (random weights, optimizer state, pre-trained towers) only on a
fresh start, so a resume never holds two copies of the state.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clipzoo_jax import cli
from clipzoo_jax import gradients
from clipzoo_jax import losses
from clipzoo_jax import optim
from clipzoo_jax import sharding
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.models import clip


# What the loop does at a step whose loss, gradient or update is not finite (the update itself is
# never applied): skip it and go on, counting it in the row as train/skipped_nonfinite, or stop.
NONFINITE_POLICIES = ("stop", "skip")


def shrink_mesh_to_fit(sizes, num_devices: int):
  """Reduces fixed axis sizes to divisors of the device count, so a CPU-sized demo config runs on
  1 or 8 devices alike. Only with config.mesh_allow_shrink; real runs keep the sizes exact."""
  remaining = num_devices
  fitted = []
  for size in sizes:
    if size == -1:
      fitted.append(-1)
      continue
    size = int(np.gcd(size, remaining))
    remaining //= size
    fitted.append(size)
  return fitted


def build_mesh(config: ml_collections.ConfigDict, devices=None):
  devices = jax.devices() if devices is None else list(devices)
  sizes = list(config.mesh)
  if config.get("mesh_allow_shrink"):
    try:
      return sharding.make_mesh(shrink_mesh_to_fit(sizes, len(devices)), devices)
    except cli.UserError as error:
      raise cli.UserError(f"config.mesh {sizes} (with config.mesh_allow_shrink) does not fit "
                          f"{len(devices)} devices: {error}") from None
  return sharding.make_mesh(sizes, devices)


def check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  """The global batch splits evenly over the batch axes of the mesh and over the processes."""
  parallel = int(np.prod([mesh.shape[axis] for axis in sharding.BATCH_AXES]))
  steps = int(config.get("grad_accum_steps", 1))
  for count, what in ((parallel, f"the data-parallel size {parallel} (mesh data x fsdp = "
                                 f"{dict(mesh.shape)})"),
                      (parallel * steps, f"config.grad_accum_steps {steps} x the data-parallel "
                                         f"size {parallel}: each micro-batch splits over the "
                                         "devices"),
                      (jax.process_count(), f"the {jax.process_count()} processes")):
    if config.global_batch_size % count:
      raise cli.UserError(f"config.global_batch_size {config.global_batch_size} is not divisible "
                          f"by {what}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Cheap consistency checks before anything compiles; errors name the config keys (the batch
  against the mesh: `check_batch_fits_mesh`)."""
  tasks = list(config.model.heads.tasks)
  task_lib.get_all(tasks, "config.model.heads.tasks")
  grid = config.model.image.image_size // config.model.image.patch_size
  head_size = grid * config.model.heads.upsample
  if tasks and config.data.label_size != head_size:
    raise cli.UserError(f"config.data.label_size is {config.data.label_size} but the heads output "
                     f"{head_size} (model.image.image_size / patch_size * model.heads.upsample = "
                     f"{config.model.image.image_size}/{config.model.image.patch_size}*"
                     f"{config.model.heads.upsample})")
  if config.data.image_size != config.model.image.image_size:
    raise cli.UserError(f"config.data.image_size {config.data.image_size} differs from "
                     f"config.model.image.image_size {config.model.image.image_size}")
  if config.tokenizer.context_length != config.model.text.context_length:
    raise cli.UserError(f"config.tokenizer.context_length {config.tokenizer.context_length} differs "
                     f"from config.model.text.context_length {config.model.text.context_length}")
  missing = sorted(set(tasks) - set(config.loss.weights))
  if missing:
    raise cli.UserError(f"config.loss.weights: no weight for the tasks {missing} of "
                        f"config.model.heads.tasks; found weights for {sorted(config.loss.weights)}")
  for task in task_lib.get_all(tasks, "config.model.heads.tasks"):
    task.validate_config(config)
  model_init = config.get("model_init")
  if model_init and not os.path.exists(os.path.expanduser(model_init)):
    raise cli.UserError(f"config.model_init {model_init}: no such file or folder (expected a "
                        "Hugging Face CLIP folder, an OpenAI .pt or an open_clip state dict)")
  if config.get("nonfinite", "stop") not in NONFINITE_POLICIES:
    raise cli.UserError(f"config.nonfinite: expected one of {list(NONFINITE_POLICIES)}, found "
                        f"{config.get('nonfinite')!r}")
  for name in ("total_steps", "log_every", "checkpoint_every"):
    if int(config[name]) < 1:
      raise cli.UserError(f"config.{name} must be >= 1, found {config[name]}")
  validate_loss_config(config)


def validate_loss_config(config: ml_collections.ConfigDict) -> None:
  """The contrastive loss kind, its chunking and gradient accumulation fit the model and batch."""
  kind = config.loss.get("contrastive", "softmax")
  if kind not in losses.CONTRASTIVE_KINDS:
    raise cli.UserError(f"config.loss.contrastive: expected one of "
                        f"{list(losses.CONTRASTIVE_KINDS)}, found {kind!r}")
  if kind == "sigmoid" and config.model.get("logit_bias_init") is None:
    raise cli.UserError("config.loss.contrastive='sigmoid' needs the learned logit bias: set "
                        f"config.model.logit_bias_init (SigLIP: {losses.SIGLIP_LOGIT_BIAS_INIT}) "
                        f"and config.model.logit_scale_init (SigLIP: log 10)")
  steps = int(config.get("grad_accum_steps", 1))
  if steps < 1:
    raise cli.UserError(f"config.grad_accum_steps must be >= 1, found {steps}")
  chunk = int(config.loss.get("contrastive_chunk", 0) or 0)
  if chunk < 0 or (chunk and config.global_batch_size % chunk):
    raise cli.UserError(f"config.loss.contrastive_chunk {chunk} does not divide "
                        f"config.global_batch_size {config.global_batch_size} (0: no chunking)")


def model_inputs(model_config: ml_collections.ConfigDict, batch_size: int = 1):
  image_size = model_config.image.image_size
  return (jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32),
          jnp.zeros((batch_size, model_config.text.context_length), jnp.int32))


def abstract_params_and_specs(model_config: ml_collections.ConfigDict):
  """Shapes and logical partition specs of the parameters, without allocating them (shapes do
  not depend on the seed). Checkpoint readers use this too, so a checkpoint that does not fit its
  config fails on the first mismatched leaf."""
  model = clip.CLIPTeX(model_config)
  boxed = jax.eval_shape(lambda r: model.init(r, *model_inputs(model_config)),
                         jax.random.PRNGKey(0))
  return nn.unbox(boxed)["params"], nn.get_partition_spec(boxed)["params"]


def state_shardings(tx, abstract_params, param_logical, mesh, rules):
  """Shardings of {step, params, opt_state}: optimizer moments follow their parameters."""
  param_shardings = sharding.logical_to_sharding(param_logical, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh),
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return {"step": sharding.replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}


def batch_fields(config: ml_collections.ConfigDict) -> dict[str, task_lib.Field]:
  """The per-example arrays of the batch contract for this config (image, tokens, labels)."""
  return task_lib.batch_fields(config.model.heads.tasks, int(config.data.label_size),
                               int(config.data.get("max_boxes", 16)), config.model)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


@dataclasses.dataclass
class Run:
  """Everything a run is, derived from its config; no data, no allocated state."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: tuple
  model: clip.CLIPTeX
  tx: optax.GradientTransformation
  schedule: Any
  abstract_state: dict  # jax.ShapeDtypeStruct leaves carrying their shardings
  abstract_batch: dict  # likewise: the global batch of the train step

  @property
  def state_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  @property
  def batch_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.abstract_batch)

  def activation_context(self):
    """Sets the mesh and rules so the model's activation constraints take effect."""
    return sharding.activation_sharding(self.mesh, self.rules)

  # -- state -----------------------------------------------------------------------------------

  def init_state(self) -> dict:
    """A fresh state, created sharded by a jitted init; towers from config.model_init if set."""
    model, tx, config = self.model, self.tx, self.config

    def init(rng):
      params = nn.unbox(model.init(rng, *model_inputs(config.model)))["params"]
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    with self.activation_context():
      state = jax.jit(init, out_shardings=self.state_shardings)(jax.random.PRNGKey(config.seed))
    if config.get("model_init"):
      state = load_pretrained_towers(state, self.state_shardings, config)
    return state

  def restore_or_init(self, checkpointer) -> tuple[dict, dict | None, int]:
    """(state, data-iterator state or None, step): the newest intact checkpoint restored into
    the abstract state's shardings, or a fresh state at step 0."""
    restored = checkpointer.restore_latest(self.abstract_state)
    if restored is None:
      return self.init_state(), None, 0
    return restored

  # -- batches ---------------------------------------------------------------------------------

  def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's NumPy batch as global jax.Arrays, checked against the batch contract."""
    missing = sorted(set(self.abstract_batch) - set(local))
    unexpected = sorted(set(local) - set(self.abstract_batch))
    if missing or unexpected:
      raise ValueError(f"input batch: fields differ from the batch contract of "
                       f"config.model.heads.tasks {list(self.config.model.heads.tasks)}: missing "
                       f"{missing}, unexpected {unexpected}")
    batch = sharding.to_global_batch(local, self.mesh)
    for name, value in batch.items():
      expected = self.abstract_batch[name]
      if value.shape != expected.shape or value.dtype != expected.dtype:
        raise ValueError(f"input batch field {name!r}: expected {expected.dtype}"
                         f"{list(expected.shape)} (config.global_batch_size, config.data.*, "
                         f"config.model.*), found {value.dtype}{list(value.shape)}")
    return batch

  def synthetic_batch(self, seed: int = 0) -> dict[str, np.ndarray]:
    """This process's share of a random batch of the contract's shapes (benchmarks, compile
    checks); `global_batch` of it is a global batch."""
    config = self.config
    rng = np.random.default_rng([seed, jax.process_index()])
    size = config.global_batch_size // jax.process_count()
    local = lambda name: (size, *self.abstract_batch[name].shape[1:])
    batch = {"image": rng.integers(0, 256, local("image")).astype(np.uint8),
             "tokens": rng.integers(1, config.model.text.vocab_size - 1,
                                    local("tokens")).astype(np.int32)}
    for task in task_lib.get_all(task_lib.canonical_order(config.model.heads.tasks)):
      batch.update(task.synthetic_labels(rng, size, int(config.data.label_size),
                                         int(config.data.get("max_boxes", 16)), config.model))
    return batch

  # -- the step --------------------------------------------------------------------------------

  @functools.cached_property
  def train_step(self) -> "TrainStep":
    return TrainStep(self)

  def compile(self):
    """The train step compiled for the abstract state and batch (memory_analysis,
    cost_analysis), with no data and no allocated state."""
    return self.train_step.lower(self.abstract_state, self.abstract_batch).compile()


class TrainStep:
  """The jitted train step of a Run, always traced with the activation-sharding context set."""

  def __init__(self, run: Run):
    self.run = run
    config = run.config
    model, tx, schedule = run.model, run.tx, run.schedule
    tasks = tuple(config.model.heads.tasks)
    weights = dict(config.loss.weights)
    loss_config = config.loss.to_dict()

    accum_steps = int(config.get("grad_accum_steps", 1))
    micro_sharding = jax.sharding.NamedSharding(
        run.mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
    apply_fn = lambda params, batch: model.apply({"params": params}, batch["image"],
                                                 batch["tokens"])

    def train_step(state, batch):
      (_, metrics), grads = gradients.loss_and_grads(
          apply_fn, state["params"], batch, tasks, weights, loss_config, accum_steps,
          lambda x: jax.lax.with_sharding_constraint(x, micro_sharding),
          unroll=bool(config.get("grad_accum_unroll", False)))
      with jax.named_scope("optimizer"):  # names its ops in profiles
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # A non-finite loss or gradient is never applied: the state stays finite, so no
        # checkpoint can hold NaNs; the loop skips the step or stops, as config.nonfinite says.
        # (The optimizers here turn finite gradients into finite updates.) The predicate reads
        # the loss and gradient norm only, not the new parameters: selects that waited on a
        # reduction over every new parameter made XLA:CPU compile the step 2-4x more slowly
        # (76 against 18 s at issue 11's CLIPTeX shape), and a lax.cond instead cost 5% per step.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state["params"], state["opt_state"]))
      metrics["train/skipped_nonfinite"] = 1.0 - finite.astype(jnp.float32)
      metrics["learning_rate"] = schedule(state["step"])
      metrics["temperature"] = jnp.exp(jnp.minimum(params["logit_scale"],
                                                   losses.MAX_LOGIT_SCALE))
      return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    self.jitted = jax.jit(train_step, in_shardings=(run.state_shardings, run.batch_shardings),
                          out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                          donate_argnums=(0,))

  def __call__(self, state, batch):
    with self.run.activation_context():
      return self.jitted(state, batch)

  def lower(self, state, batch):
    with self.run.activation_context():
      return self.jitted.lower(state, batch)


def setup(config: ml_collections.ConfigDict, devices=None) -> Run:
  """The Run of `config` on `devices` (default: all devices; an AOT check passes a topology's)."""
  devices = jax.devices() if devices is None else list(devices)
  validate_config(config)
  mesh = build_mesh(config, devices)
  check_batch_fits_mesh(config, mesh)
  rules = sharding.rules_from_config(config.get("sharding_rules"))
  model = clip.CLIPTeX(config.model, platform=devices[0].platform)
  abstract_params, param_logical = abstract_params_and_specs(config.model)
  tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
  shardings = state_shardings(tx, abstract_params, param_logical, mesh, rules)
  abstract_state = _abstract({"step": jax.ShapeDtypeStruct((), jnp.int32),
                              "params": abstract_params,
                              "opt_state": jax.eval_shape(tx.init, abstract_params)}, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {name: jax.ShapeDtypeStruct((config.global_batch_size, *field.shape),
                                               np.dtype(field.dtype), sharding=batch_sharding)
                    for name, field in batch_fields(config).items()}
  return Run(config, mesh, rules, model, tx, schedule, abstract_state, abstract_batch)


def load_pretrained_towers(state, shardings, config):
  """Replaces tower weights with a pre-trained CLIP (config.model_init); heads stay fresh."""
  from clipzoo_jax import convert  # pylint: disable=import-outside-toplevel
  loaded = convert.load_pretrained(config.model_init, config.model,
                                   fmt=config.get("model_init_format", "auto"))
  params = dict(state["params"])
  for name, subtree in loaded.items():
    if name not in params:
      raise cli.UserError(f"config.model_init {config.model_init}: loaded item {name!r} is not a "
                       f"model parameter; model has {sorted(params)}")
    expected = jax.tree.map(lambda x: x.shape, params[name])
    found = jax.tree.map(lambda x: x.shape, subtree)
    if expected != found:
      raise cli.UserError(f"config.model_init {config.model_init}: shapes of {name!r} differ from "
                       "the model's (expected, found) " f"{expected} vs {found}")
    params[name] = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s),
                                subtree, shardings["params"][name])
  return {**state, "params": params}
