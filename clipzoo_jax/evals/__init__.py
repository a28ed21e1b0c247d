"""Evaluation of a CLIP encoder: zero-shot, retrieval and dense probes, with checked metrics.

The training loop and `tools/evaluate.py` both call `build_evaluators(config, run, workdir)` and
write what each evaluator's `.run(params)` yields into the step's metrics row. The heavy modules
(JAX, TensorFlow) are imported on that call, so `clipzoo_jax.evals.metrics` stays light.
"""


def build_evaluators(config, run, workdir: str) -> list:
  """The evaluators of `config.evals` on `run`'s mesh (see `clipzoo_jax.evals.base`)."""
  from clipzoo_jax.evals import base  # pylint: disable=import-outside-toplevel
  return base.build_evaluators(config, run, workdir)
