"""Evaluation outside the training loop: the run's evaluators on a checkpoint of a workdir, or on a
pre-trained CLIP (Hugging Face / OpenAI / open_clip, through `convert.load_pretrained`), written
into that step's row of the workdir's metrics.jsonl (merged with what training wrote there, never
a second row) and returned for a printed table.

It builds the run with `run.setup` and the evaluators with `build_evaluators`, exactly as training
does, and places the restored parameters on the run's parameter shardings, so a checkpoint gives
the same numbers here as it did during training (on the same device count).
"""

from __future__ import annotations


import jax
import ml_collections
import numpy as np

from clipzoo_jax import checkpoint as checkpoint_lib
from clipzoo_jax import cli
from clipzoo_jax import metrics as metrics_lib
from clipzoo_jax import run as run_lib
from clipzoo_jax import storage
from clipzoo_jax import evals


def config_for(workdir: str, config: ml_collections.ConfigDict | None):
  """The given config, else the one training saved in the workdir."""
  if config is not None:
    return config
  if not storage.exists(storage.join(workdir, checkpoint_lib.CONFIG_NAME)):
    raise cli.UserError(f"--workdir {workdir}: no {checkpoint_lib.CONFIG_NAME}; pass --config")
  return checkpoint_lib.load_config(workdir)


def checkpoint_params(run, workdir: str, step: int | None):
  """(params on the run's shardings, step) of a checkpoint (latest unless `step`)."""
  if step is None:
    checkpointer = checkpoint_lib.Checkpointer(workdir, async_save=False)
    step = checkpointer.latest_step()
    checkpointer.close()
    if step is None:
      raise cli.UserError(f"--workdir {workdir}: no checkpoint in "
                          f"{checkpoint_lib.checkpoint_dir(workdir)}; train first, or pass --init")
  try:
    params, _ = checkpoint_lib.restore_params(workdir, step)
  except FileNotFoundError as error:
    raise cli.UserError(str(error)) from None
  shardings = run.state_shardings["params"]
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings), step


def pretrained_params(config, init: str, init_format: str = "auto"):
  """(run, params) of a run whose towers come from a pre-trained CLIP; the heads are fresh."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model_init, config.model_init_format = init, init_format
  run = run_lib.setup(config)
  return run, run.init_state()["params"]


def evaluate(config, workdir: str, step: int | None = None, init: str | None = None,
             init_format: str = "auto") -> tuple[int, dict[str, dict[str, float]]]:
  """Runs every evaluator of the config; returns (step, {evaluator: {metric: value}}) and merges
  the values into `step`'s row of `<workdir>/metrics.jsonl` (step 0 for `init`)."""
  config = config_for(workdir, config)
  if not config.get("evals"):
    raise cli.UserError("config.evals is empty: nothing to evaluate (add evaluators to the "
                        "config, e.g. configs/demo.py)")
  if init:
    run, params = pretrained_params(config, init, init_format)
    step = 0
  else:
    run = run_lib.setup(config)
    params, step = checkpoint_params(run, workdir, step)
  results = {}
  writer = metrics_lib.MetricsWriter(workdir)
  try:
    for evaluator in evals.build_evaluators(run.config, run, workdir):
      results[evaluator.name] = dict(evaluator.run(params))
      writer.write(step, results[evaluator.name])
      writer.flush()
  finally:
    writer.close()
  return step, results


def format_table(step: int, results: dict[str, dict[str, float]]) -> str:
  """A plain-text table: one line per metric, grouped by evaluator."""
  names = [name for values in results.values() for name in values]
  width = max([len(n) for n in names] + [6])
  lines = [f"step {step}", f"{'metric':<{width}}  value"]
  for values in results.values():
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in values.items()]
  return "\n".join(lines)
