"""Pseudo-label an image-text corpus with model-zoo experts into TFRecord shards + manifest.

  python tools/pseudo_label.py --config=configs/pseudo_label/zoo.py:seg=segformer-b5 \
      --corpus='tar:/data/cc3m/{00000..00331}.tar' --output_dir=/data/cc3m_pl \
      --num_workers=8 --worker_index=3
  python tools/pseudo_label.py ... --runner=ray --ray_address=auto     # on a Ray cluster's node
  python tools/pseudo_label.py --verify --output_dir=/data/cc3m_pl

Quote the corpus pattern: unquoted, bash expands the braces into one --corpus flag per tar, which
this tool refuses. Rerunning the same command resumes: complete shards are skipped, partial ones
redone; on a finished directory it stops before loading any expert. Worker defaults come from the
launcher's environment (WORLD_SIZE/RANK, SLURM_NTASKS/SLURM_PROCID). `--runner=ray` writes the
same shards from a Ray cluster's workers (`pip install -r requirements-ray.txt`; sized by
config.ray); without --ray_address it starts Ray on this machine only. User errors print one line;
--debug shows their traceback.
"""

import functools
import os
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
from ml_collections import config_flags

from clipzoo_jax import cli
from clipzoo_jax.pseudo_label import config as config_lib
from clipzoo_jax.pseudo_label import job

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/pseudo_label/*.py[:args]")
_CORPUS = flags.DEFINE_string("corpus", None, "tar:'PATTERN' (quoted) | csv:PATH | tsv:PATH | "
                              "tfds:NAME/SPLIT")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "directory of the shards and manifest",
                                  required=True)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "workers sharing the job")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", None, "this worker, in [0, num_workers)")
_VERIFY = flags.DEFINE_bool("verify", False, "check a finished directory against its manifest")
_RUNNER = flags.DEFINE_enum("runner", "local", ["local", "ray"], "local: this process (or one of "
                            "--num_workers); ray: the workers of a Ray cluster")
_RAY_ADDRESS = flags.DEFINE_string("ray_address", "", "--runner=ray: auto (the cluster this node "
                                   "belongs to), HEAD_HOST:PORT, or empty for Ray on this machine")


def _from_env(names, default: int) -> int:
  for name in names:
    if os.environ.get(name):
      try:
        return int(os.environ[name])
      except ValueError:
        raise cli.UserError(f"environment variable {name}: expected an integer, "
                            f"found {os.environ[name]!r}") from None
  return default


def verify(output_dir: str) -> int:
  problems = job.verify_job(output_dir)
  for problem in problems:
    print(f"PROBLEM {problem}")
  print(f"{output_dir}: {'OK' if not problems else f'{len(problems)} problems'}")
  return 1 if problems else 0


def main(argv) -> int:
  del argv  # cli.run refuses positional arguments
  if _VERIFY.value:
    return verify(_OUTPUT_DIR.value)
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. configs/pseudo_label/zoo.py)")
  num_workers = _NUM_WORKERS.value or _from_env(("WORLD_SIZE", "SLURM_NTASKS"), 1)
  worker_index = _WORKER_INDEX.value
  if worker_index is None:
    worker_index = _from_env(("RANK", "SLURM_PROCID"), 0)
  config = _CONFIG.value
  corpus = config_lib.make_corpus(config, _CORPUS.value)
  settings = config_lib.job_settings(config, corpus)
  manifest = job.finished_job(_OUTPUT_DIR.value, settings)
  if manifest is not None:
    print(f"{_OUTPUT_DIR.value}: already complete ({manifest['num_records']} records in "
          f"{len(manifest['shards'])} shards) from this config; nothing to do (--verify checks it)")
    return 0
  command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
  log = lambda line: print(line, flush=True)
  if _RUNNER.value == "ray":
    if num_workers != 1:
      raise app.UsageError("--runner=ray hands shards out itself: drop --num_workers (and "
                           "WORLD_SIZE/SLURM_NTASKS); size it with --config.ray.num_workers")
    ray_runner = _import_ray_runner()
    ray_runner.run(corpus, functools.partial(config_lib.make_experts, config), _OUTPUT_DIR.value,
                   config_lib.job_options(config), config_lib.ray_options(config),
                   _RAY_ADDRESS.value, command, log, settings)
    return 0
  experts = config_lib.make_experts(config)
  job.run_worker(corpus, experts, _OUTPUT_DIR.value, config_lib.job_options(config),
                 num_workers=num_workers, worker_index=worker_index, command=command, log=log,
                 settings=settings)
  return 0


def _import_ray_runner():
  try:
    from clipzoo_jax.pseudo_label import ray_runner
  except ImportError as e:
    raise cli.UserError(f"--runner=ray needs Ray ({e}): python -m pip install -r "
                        "requirements-ray.txt") from None
  return ray_runner


if __name__ == "__main__":
  cli.run(main)
