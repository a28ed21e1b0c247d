"""Small shared builders for tests: a tiny CLIPTeX config, its run on a given mesh, its
initialised parameters, and webdataset-style tar files."""

import glob
import io
import json
import os
import tarfile

import jax
import jax.numpy as jnp
import flax.linen as nn
import pytest

from clipzoo_jax import config_base
from clipzoo_jax import run as run_lib
from clipzoo_jax.models import clip

TASKS = ("seg", "depth", "normals", "det")


def tiny_config(tasks=TASKS, **overrides):
  config = config_base.demo_config(list(tasks))
  config.model.image.image_size = config.data.image_size = 32
  config.data.label_size = 16
  config.data.num_workers = 0  # decode threads in-process; worker processes have their own tests
  config.model.text.context_length = config.tokenizer.context_length = 8
  config.model.text.vocab_size = 64
  config.model.heads.hidden = 8
  for key, value in overrides.items():
    config[key] = value
  return config


def run_on(config, mesh_sizes, devices=None):
  """`run.setup` of `config` on a mesh of exactly `mesh_sizes` over `devices` (default: all)."""
  config = config.copy_and_resolve_references()
  config.mesh, config.mesh_allow_shrink = list(mesh_sizes), False
  return run_lib.setup(config, devices)


def init_params(config, seed=0):
  model = clip.CLIPTeX(config.model)
  image = jnp.zeros((2, config.model.image.image_size, config.model.image.image_size, 3))
  tokens = jnp.zeros((2, config.model.text.context_length), jnp.int32)
  return model, nn.unbox(model.init(jax.random.PRNGKey(seed), image, tokens))["params"]


def write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def metrics_file_rows(workdir):
  """The raw rows of a run's metrics.jsonl, line by line (no merging)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def tensorboard_scalars(workdir):
  """{(tag, step): [values]} over every event file, read with TensorFlow's own reader."""
  import tensorflow as tf
  found = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        found.setdefault((value.tag, event.step), []).append(value.simple_value)
  return found


def assert_tensorboard_matches_file(workdir):
  """Every scalar of every row is in TensorBoard exactly once, and nothing else is."""
  expected = {(k, row["step"]): [pytest.approx(v)] for row in metrics_file_rows(workdir)
              for k, v in row.items() if k != "step"}
  assert tensorboard_scalars(workdir) == expected
