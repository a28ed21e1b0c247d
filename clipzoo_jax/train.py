"""The one training loop: build mesh, state, input and step from a config, then step, log,
checkpoint and resume. Experiments differ by config (model, tasks, loss weights), never by loop."""

from __future__ import annotations

import logging
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clipzoo_jax import checkpoint as checkpoint_lib
from clipzoo_jax import losses
from clipzoo_jax import metrics as metrics_lib
from clipzoo_jax import optim
from clipzoo_jax import sharding
from clipzoo_jax.data import loader as loader_lib
from clipzoo_jax.data import prepare
from clipzoo_jax.models import clip

log = logging.getLogger(__name__)


def build_mesh(config: ml_collections.ConfigDict):
  sizes = list(config.mesh)
  if config.get("mesh_allow_shrink"):
    sizes = shrink_mesh_to_fit(sizes, jax.device_count())
  return sharding.make_mesh(sizes)


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


def model_inputs(config: ml_collections.ConfigDict, batch_size: int = 1):
  image_size = config.model.image.image_size
  return (jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32),
          jnp.zeros((batch_size, config.model.text.context_length), jnp.int32))


def abstract_params_and_specs(model, config, rng):
  """Shapes and logical partition specs of the parameters, without allocating them."""
  boxed = jax.eval_shape(lambda r: model.init(r, *model_inputs(config)), rng)
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


def create_state(model, tx, config, mesh, rules, rng):
  """(state, shardings): the state is created already sharded by a jitted init."""
  abstract_params, param_logical = abstract_params_and_specs(model, config, rng)
  shardings = state_shardings(tx, abstract_params, param_logical, mesh, rules)

  def init(r):
    params = nn.unbox(model.init(r, *model_inputs(config)))["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  with sharding.activation_sharding(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def load_pretrained_towers(state, shardings, config):
  """Replaces tower weights with a pre-trained CLIP (config.model_init); heads stay fresh."""
  from clipzoo_jax import convert
  loaded = convert.load_pretrained(config.model_init, config.model,
                                   fmt=config.get("model_init_format", "auto"))
  params = dict(state["params"])
  for name, subtree in loaded.items():
    if name not in params:
      raise ValueError(f"config.model_init {config.model_init}: loaded item {name!r} is not a "
                       f"model parameter; model has {sorted(params)}")
    expected = jax.tree.map(lambda x: x.shape, params[name])
    found = jax.tree.map(lambda x: x.shape, subtree)
    if expected != found:
      raise ValueError(f"config.model_init {config.model_init}: shapes of {name!r} differ from "
                       "the model's (expected, found) " f"{expected} vs {found}")
    params[name] = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s),
                                subtree, shardings["params"][name])
  return {**state, "params": params}


def make_train_step(model, tx, schedule, config, shardings, batch_shardings, mesh, rules):
  tasks = tuple(config.model.heads.tasks)
  weights = dict(config.loss.weights)
  depth_loss = config.loss.get("depth", "ssi")

  def train_step(state, batch):
    def loss_fn(params):
      outputs = model.apply({"params": params}, batch["image"], batch["tokens"])
      return losses.total_loss(outputs, batch, tasks, weights, depth_loss)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = schedule(state["step"])
    metrics["temperature"] = jnp.exp(jnp.minimum(params["logit_scale"], losses.MAX_LOGIT_SCALE))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  jitted = jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return TrainStep(jitted, mesh, rules)


class TrainStep:
  """The jitted step, always traced with the activation-sharding context set."""

  def __init__(self, jitted, mesh, rules):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules

  def __call__(self, state, batch):
    with sharding.activation_sharding(self.mesh, self.rules):
      return self.jitted(state, batch)

  def compile(self, state, batch):
    """Ahead-of-time compiled executable (memory_analysis, cost_analysis) for these inputs."""
    with sharding.activation_sharding(self.mesh, self.rules):
      return self.jitted.lower(state, batch).compile()


class PreemptionFlag:
  """SIGTERM (the preemption notice on TPU VMs and clusters) asks the loop to save and stop."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. under some test runners)
      pass

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Cheap consistency checks before anything compiles; errors name the config keys."""
  tasks = list(config.model.heads.tasks)
  grid = config.model.image.image_size // config.model.image.patch_size
  head_size = grid * config.model.heads.upsample
  if tasks and config.data.label_size != head_size:
    raise ValueError(f"config.data.label_size is {config.data.label_size} but the heads output "
                     f"{head_size} (model.image.image_size / patch_size * model.heads.upsample = "
                     f"{config.model.image.image_size}/{config.model.image.patch_size}*"
                     f"{config.model.heads.upsample})")
  if config.data.image_size != config.model.image.image_size:
    raise ValueError(f"config.data.image_size {config.data.image_size} differs from "
                     f"config.model.image.image_size {config.model.image.image_size}")
  if config.global_batch_size % jax.device_count():
    raise ValueError(f"config.global_batch_size {config.global_batch_size} is not divisible by "
                     f"the {jax.device_count()} devices")
  for name in ("total_steps", "log_every", "checkpoint_every"):
    if int(config[name]) < 1:
      raise ValueError(f"config.{name} must be >= 1, found {config[name]}")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the last logged metrics row."""
  validate_config(config)
  checkpoint_lib.save_config(workdir, config)
  mesh = build_mesh(config)
  rules = sharding.rules_from_config(config.get("sharding_rules"))
  log.info("mesh %s", dict(mesh.shape))

  dataset_dir = prepare.prepare_dataset(config.data, workdir)
  tokenizer = prepare.prepare_tokenizer(config.tokenizer, dataset_dir, workdir)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"config.model.text.vocab_size {config.model.text.vocab_size} is smaller than "
                     f"the tokenizer's {tokenizer.vocab_size} ({config.tokenizer.directory})")
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.directory = dataset_dir
  pipeline = loader_lib.InputPipeline(
      data_config, tokenizer, config.global_batch_size, tuple(config.model.heads.tasks),
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())

  model = clip.CLIPTeX(config.model)
  rng = jax.random.PRNGKey(config.seed)
  abstract_params, _ = abstract_params_and_specs(model, config, rng)
  tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
  state, shardings = create_state(model, tx, config, mesh, rules, rng)

  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint_every,
                                             config.get("keep_checkpoints", 3),
                                             config.get("async_checkpointing", True))
  start = checkpointer.latest_step()
  if start is not None:
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    state, data_state = checkpointer.restore(start, abstract_state)
    pipeline.set_state(data_state)
    log.info("resumed from step %d", start)
  else:
    start = 0
    if config.get("model_init"):
      state = load_pretrained_towers(state, shardings, config)

  iterator = iter(pipeline)
  first = loader_lib.to_global_batch(next(iterator), mesh)
  batch_shardings = jax.tree.map(lambda x: x.sharding, first)
  step_fn = make_train_step(model, tx, schedule, config, shardings, batch_shardings, mesh, rules)
  return run_loop(config, workdir, state, step_fn, first, iterator, mesh, pipeline,
                  checkpointer, start)


def interval_mean(step_metrics: list[dict]) -> dict:
  """Mean of each metric over the steps since the last log row (learning rate: the last one)."""
  fetched = jax.device_get(step_metrics)
  mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
  mean["learning_rate"] = float(fetched[-1]["learning_rate"])
  return mean


def run_loop(config, workdir, state, step_fn, first_batch, iterator, mesh, pipeline,
             checkpointer, start: int) -> dict:
  writer = metrics_lib.MetricsWriter(workdir, config.total_steps)
  progress = metrics_lib.Progress(config.total_steps, start, config.global_batch_size)
  preemption = PreemptionFlag()
  batch, row, pending = first_batch, {}, []
  for step in range(start + 1, config.total_steps + 1):
    if batch is None:
      batch = loader_lib.to_global_batch(next(iterator), mesh)
    state, step_metrics = step_fn(state, batch)
    pending.append(step_metrics)  # device arrays: fetched only when logging
    batch = None
    stopping = preemption.requested  # read once: a signal landing mid-step waits for the next
    final = step == config.total_steps or stopping
    if step % config.log_every == 0 or final or step == start + 1:
      rate, eta = progress.tick(step)
      row = writer.write(step, {**interval_mean(pending), "examples_per_sec": rate})
      pending = []
      if not np.isfinite(row["loss"]):
        raise FloatingPointError(f"step {step}: mean loss since the last row is {row['loss']}; "
                                 "stopping (the last checkpoint may predate the divergence)")
      if jax.process_index() == 0:
        print(metrics_lib.Progress.line(step, config.total_steps, row, rate, eta), flush=True)
    checkpointer.save(step, state, pipeline.get_state(), force=final)
    if stopping:
      log.warning("SIGTERM: saved step %d, stopping", step)
      break
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if jax.process_index() == 0:
    from clipzoo_jax import plots
    print(f"loss curves: {plots.plot_losses(workdir)}", flush=True)
  return row


def main_from_flags(config, workdir: str) -> None:
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
  log.setLevel(logging.INFO)
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  log.addHandler(handler)
  log.propagate = False
  train(config, workdir)
