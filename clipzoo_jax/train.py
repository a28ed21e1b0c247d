"""The one training loop: set up the run from its config (`run.setup`), restore or start it, then
step, log, checkpoint and stop. Experiments differ by config (model, tasks, loss weights), never
by loop."""

from __future__ import annotations

import dataclasses
import logging
import sys

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from clipzoo_jax import cli
from clipzoo_jax import checkpoint as checkpoint_lib
from clipzoo_jax import metrics as metrics_lib
from clipzoo_jax import optim
from clipzoo_jax import periodic
from clipzoo_jax import progress as progress_lib
from clipzoo_jax import run as run_lib
from clipzoo_jax import stop_signal
from clipzoo_jax import storage
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.convert import text_pooling
from clipzoo_jax.data import pipelines, prepare, shards

log = logging.getLogger(__name__)


class StopRequest:
  """SIGTERM (the preemption notice on TPU VMs and clusters) asks the run to save and stop.

  Hosts see the signal at different moments, so `agreed` makes them decide together: every
  `check_every` steps the hosts all-gather their flags and all stop at the same step, where each
  takes part in the same checkpoint save. The flag is `stop_signal`'s, which tools/train.py
  installs before anything slow, so a SIGTERM while the run starts is not lost either.
  """

  def __init__(self, check_every: int = 1):
    self.check_every = max(int(check_every), 1)
    stop_signal.install()

  def agreed(self, step: int) -> bool:
    if jax.process_count() == 1:
      return stop_signal.requested()
    if step % self.check_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(stop_signal.requested()))
    return bool(np.max(flags))


def make_pipeline(config: ml_collections.ConfigDict, workdir: str) -> pipelines.Pipeline:
  """The training input of this process: data and tokenizer made to exist, then the loader."""
  dataset_dir = prepare.prepare_dataset(config.data, workdir)
  task_lib.check_dataset(config.model.heads.tasks, shards.read_manifest(dataset_dir),
                         config.model, storage.join(dataset_dir, shards.MANIFEST_NAME))
  tokenizer = prepare.prepare_tokenizer(config.tokenizer, dataset_dir, workdir)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise cli.UserError(f"config.model.text.vocab_size {config.model.text.vocab_size} is smaller than "
                     f"the tokenizer's {tokenizer.vocab_size} ({config.tokenizer.directory})")
  # the text tower pools at the end-of-text id: it must be the one this tokenizer writes
  text_pooling.check_eos(config.model.text.get("eos_token_id"), config.model.text.vocab_size,
                         "config.model.text.eos_token_id", text_pooling.read_tokenizer_ids(
                             prepare.resolve_path(config.tokenizer.directory, workdir)))
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.directory = dataset_dir
  for name, source in dict(data_config.get("sources") or {}).items():
    data_config.sources[name].directory = prepare.resolve_path(source["directory"], workdir)
  return pipelines.build(data_config, tokenizer, config.global_batch_size,
                         tuple(config.model.heads.tasks), seed=config.seed,
                         process_index=jax.process_index(), process_count=jax.process_count())


@dataclasses.dataclass
class Loop:
  """What the loop carries from step to step, besides the state."""
  workdir: str
  run: run_lib.Run
  pipeline: pipelines.Pipeline
  checkpointer: checkpoint_lib.Checkpointer
  writer: metrics_lib.MetricsWriter
  start: int  # the step the state holds when the loop begins
  stop: StopRequest
  evaluators: list


def warn_if_schedule_changed(previous, config, step: int) -> None:
  """A resumed run whose config moves the learning-rate schedule (e.g. a raised total_steps
  stretches the cosine) says so, with the rate at the resume step before and after."""
  before = float(optim.learning_rate_schedule(previous.optim, previous.total_steps)(step))
  after = float(optim.learning_rate_schedule(config.optim, config.total_steps)(step))
  if not np.isclose(before, after, rtol=1e-6, atol=0.0):
    length = optim.schedule_steps(previous.optim, previous.total_steps)
    log.warning("the learning-rate schedule changed since the run that saved step %d: the rate "
                "there was %.3g and is now %.3g (schedule over %d steps, now %d). To extend a run "
                "on its own schedule, pass --config.optim.schedule_steps=%d", step, before, after,
                length, optim.schedule_steps(config.optim, config.total_steps), length)


def _check_start(start: int, config) -> bool:
  """Whether there are steps left to run; a checkpoint past total_steps is an error."""
  if start > config.total_steps:
    raise cli.UserError(f"the workdir's checkpoint is at step {start}, past config.total_steps "
                     f"{config.total_steps}; raise --config.total_steps or use another --workdir")
  if start == config.total_steps:
    log.warning("the workdir's checkpoint is at step %d = config.total_steps: nothing to do "
                "(raise --config.total_steps to continue)", start)
  return start < config.total_steps


def check_paths(config, workdir: str) -> None:
  """The workdir, data and tokenizer may be local paths or URLs (`gs://bucket/path`, `storage`).
  Before anything is created, each URL must name a scheme this machine can read and a bucket
  that exists; a problem is one line naming the flag or config key and the path."""
  model_init = config.get("model_init")
  if model_init and storage.is_url(model_init):
    raise cli.UserError(f"config.model_init: {model_init} is a URL; a pre-trained model is read "
                        "from a local file or folder: copy it to the machine first (e.g. "
                        f"gcloud storage cp -r {model_init} /tmp/)")
  paths = {"--workdir": workdir, "config.data.directory": config.data.get("directory"),
           "config.tokenizer.directory": config.tokenizer.get("directory")}
  for name, source in dict(config.data.get("sources") or {}).items():
    paths[f"config.data.sources.{name}.directory"] = source.get("directory")
  for where, path in paths.items():
    if not path or not storage.is_url(path):
      continue
    try:
      problem = storage.bucket_problem(str(path))
    except storage.StorageError as error:
      raise cli.UserError(f"{where}: {error}") from None
    if problem:
      raise cli.UserError(f"{where}: {path}: {problem}")


def train(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains (or resumes) in `workdir` on `devices` (default: all); returns the last logged
  metrics row. Everything that can be checked without compiling or reading data is checked
  first."""
  check_paths(config, workdir)
  stop = StopRequest(config.get("preemption_check_every", 1))
  run = run_lib.setup(config, devices)
  log.info("mesh %s", dict(run.mesh.shape))
  previous = (checkpoint_lib.load_config(workdir)
              if storage.exists(storage.join(workdir, checkpoint_lib.CONFIG_NAME)) else None)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.get("keep_checkpoints", 3),
                                             config.get("async_checkpointing", True))
  latest = checkpointer.latest_step()
  if latest is not None and not _check_start(latest, config):
    checkpointer.close()
    return {}
  evaluators = build_evaluators(config, run, workdir)
  checkpoint_lib.save_config(workdir, config)
  pipeline = make_pipeline(config, workdir)
  state, data_state, start = run.restore_or_init(checkpointer)
  if data_state is not None:
    pipeline.set_state(data_state)
    log.info("resumed from step %d", start)
    if previous is not None:
      warn_if_schedule_changed(previous, config, start)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
  try:
    return run_loop(Loop(workdir, run, pipeline, checkpointer, writer, start, stop, evaluators),
                    state)
  except BaseException:
    finish_saves_quietly(checkpointer)  # so the real error is the last thing printed
    raise
  finally:
    writer.close()
    pipeline.close()  # stops the loader's worker processes


def build_evaluators(config, run, workdir: str) -> list:
  """The evaluators of `config.evals` (none when it is empty)."""
  if not config.get("evals"):
    return []
  from clipzoo_jax import evals  # pylint: disable=import-outside-toplevel
  return evals.build_evaluators(config, run, workdir)


def finish_saves_quietly(checkpointer) -> None:
  """After an error in the loop: let an in-flight save finish (or fail) and close the manager,
  logging, never raising, so the loop's own error is what the user reads."""
  try:
    checkpointer.wait()
    checkpointer.close()
  except Exception as error:  # noqa: BLE001
    log.error("the in-flight checkpoint save failed too: %s", error)


def interval_mean(step_metrics: list[dict]) -> dict:
  """Each metric since the last log row: the mean over the applied (finite) steps, the number
  of skipped steps, and the last learning rate."""
  fetched = jax.device_get(step_metrics)
  applied = [m for m in fetched if not m["train/skipped_nonfinite"]] or fetched
  mean = {k: float(np.mean([m[k] for m in applied])) for k in fetched[-1]}
  mean["train/skipped_nonfinite"] = float(sum(m["train/skipped_nonfinite"] for m in fetched))
  mean["learning_rate"] = float(fetched[-1]["learning_rate"])
  return mean


class NonFiniteError(cli.UserError, FloatingPointError):
  """config.nonfinite='stop' and a step had a non-finite loss, gradient or update."""


def check_finite(step: int, metrics: dict) -> None:
  """Raises NonFiniteError naming the step and its non-finite values (the update of that step
  was not applied, so every checkpoint so far is finite)."""
  fetched = jax.device_get(metrics)
  if not fetched["train/skipped_nonfinite"]:
    return
  bad = sorted(k for k, v in fetched.items() if not np.isfinite(v)) or ["the updated parameters"]
  raise NonFiniteError(f"step {step}: non-finite {', '.join(bad)}; the step was not applied and "
                       "the run stops (config.nonfinite='stop'; 'skip' goes on without such "
                       "steps). Lower optim.learning_rate, or resume from the last checkpoint")


def run_loop(loop: Loop, state) -> dict:
  config = loop.run.config
  total = config.total_steps
  log_due = periodic.Every(config.log_every, at_first=True)
  checkpoint_due = periodic.Every(config.checkpoint_every)
  stop_on_nonfinite = config.get("nonfinite", "stop") == "stop"
  progress = progress_lib.Progress(total, loop.start, config.global_batch_size)
  iterator = iter(loop.pipeline)
  row, pending, previous = {}, [], None
  for step in range(loop.start + 1, total + 1):
    batch = loop.run.global_batch(next(iterator))
    state, step_metrics = loop.run.train_step(state, batch)
    pending.append(step_metrics)  # device arrays: fetched only when logging
    if stop_on_nonfinite and previous is not None:
      check_finite(step - 1, previous)  # one step behind: the device runs ahead meanwhile
    previous = step_metrics
    moment = periodic.Moment(step, total, loop.start + 1, stopping=loop.stop.agreed(step))
    if stop_on_nonfinite and (moment.stopping or moment.is_last or checkpoint_due.due(moment)):
      check_finite(step, step_metrics)
    if log_due.due(moment):
      rate, eta = progress.tick(step)
      row = loop.writer.write(step, {**interval_mean(pending), "examples_per_sec": rate,
                                     **loop.pipeline.counters()})
      pending = []
      if jax.process_index() == 0:
        print(progress_lib.Progress.line(step, total, row, rate, eta), flush=True)
    for evaluator in loop.evaluators:
      if evaluator.every.due(moment):
        row = loop.writer.write(step, dict(evaluator.run(state["params"])))
    if checkpoint_due.due(moment):
      loop.checkpointer.save(step, state, loop.pipeline.get_state())
    loop.writer.flush()
    if moment.stopping:
      log.warning("SIGTERM: saved step %d, stopping", step)
      break
  loop.checkpointer.wait()
  loop.checkpointer.close()
  loop.writer.close()
  if jax.process_index() == 0:
    from clipzoo_jax import plots  # pylint: disable=import-outside-toplevel
    print(f"loss curves: {plots.plot_losses(loop.workdir)}", flush=True)
  return row


def main_from_flags(config, workdir: str) -> None:
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
  log.setLevel(logging.INFO)
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  log.addHandler(handler)
  log.propagate = False
  train(config, workdir)
