"""Small shared builders for tests: a tiny CLIPTeX config, its initialised parameters, and
webdataset-style tar files."""

import io
import tarfile

import jax
import jax.numpy as jnp
import flax.linen as nn

from clipzoo_jax import config_base
from clipzoo_jax.models import clip

TASKS = ("seg", "depth", "normals", "det")


def tiny_config(tasks=TASKS, **overrides):
  config = config_base.demo_config(list(tasks))
  config.model.image.image_size = config.data.image_size = 32
  config.data.label_size = 16
  config.model.text.context_length = 8
  config.model.text.vocab_size = 64
  config.model.heads.hidden = 8
  for key, value in overrides.items():
    config[key] = value
  return config


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
