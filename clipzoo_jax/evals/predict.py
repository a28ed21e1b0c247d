"""The model's predict functions that evaluators receive, jitted once on the run's mesh, and the
placement of host batches onto it.

Each function takes the train state's `params` (sharded as the run shards them) and a global
batch sharded over ('data', 'fsdp'), and runs with the run's activation-sharding context, so an
evaluation is laid out exactly like a train step. Outputs an evaluator reads on the host are
replicated (every process can read them); patch features stay batch-sharded for probe training.

Every process reads the same evaluation stream and places the whole global batch
(`make_array_from_callback` keeps only its own devices' rows), so there is nothing to split by
process. A short last batch is padded with zeros to the fixed batch size (one compiled shape)
and its padding rows are dropped from the outputs (`pad_batch` returns the valid count).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from clipzoo_jax import cli
from clipzoo_jax import sharding
from clipzoo_jax.models import clip


def l2_normalize(x, axis: int = -1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> tuple[dict, int]:
  """(numeric fields padded with zero rows to `size`, number of real rows)."""
  arrays = {name: np.asarray(value) for name, value in batch.items()
            if np.asarray(value).dtype.kind in "biuf"}
  count = len(next(iter(arrays.values())))
  if count > size:
    raise ValueError(f"pad_batch: batch of {count} is larger than the batch size {size}")
  pad = lambda a: np.concatenate([a, np.zeros((size - count, *a.shape[1:]), a.dtype)])
  return ({name: (pad(a) if count < size else a) for name, a in arrays.items()}, count)


def to_device(array: np.ndarray, target: jax.sharding.Sharding) -> jax.Array:
  """A host array that every process holds in full, as a global array with `target` sharding."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def batch_devices(mesh) -> int:
  return int(np.prod([mesh.shape[axis] for axis in sharding.BATCH_AXES]))


def check_batch_size(batch_size: int, mesh, where: str) -> int:
  shards = batch_devices(mesh)
  if batch_size < 1 or batch_size % shards:
    raise cli.UserError(f"{where}: {batch_size} must be a positive multiple of the {shards} "
                        f"devices the batch is sharded over (mesh 'data' x 'fsdp')")
  return batch_size


class Predictors:
  """`image_embedding`, `text_embedding` (unit length), `patch_features` (B, g, g, D) and
  `head_outputs` (the model's own task heads), each `fn(params, global_batch_array)`."""

  def __init__(self, run):
    self.run = run
    model = run.model
    self.batch_sharding = sharding.batch_sharding(run.mesh)
    self.replicated = sharding.replicated(run.mesh)
    apply = lambda params, x, method: model.apply({"params": params}, x, method=method)

    def image_embedding(params, images):
      return l2_normalize(apply(params, images, clip.CLIPTeX.encode_image)[0].astype(jnp.float32))

    def text_embedding(params, tokens):
      return l2_normalize(apply(params, tokens, clip.CLIPTeX.encode_text).astype(jnp.float32))

    def patch_features(params, images):
      return apply(params, images, clip.CLIPTeX.encode_image)[1].astype(jnp.float32)

    def head_outputs(params, images):
      return apply(params, images, lambda m, x: m.heads(m.encode_image(x)[1]))

    params_sharding = run.state_shardings["params"]
    jit = lambda fn, out: jax.jit(fn, in_shardings=(params_sharding, self.batch_sharding),
                                  out_shardings=out)
    self._functions = {
        "image_embedding": jit(image_embedding, self.replicated),
        "text_embedding": jit(text_embedding, self.replicated),
        "patch_features": jit(patch_features, self.batch_sharding),
        "head_outputs": jit(head_outputs, self.replicated),
    }

  def __call__(self, name: str, params, batch: np.ndarray | jax.Array):
    if not isinstance(batch, jax.Array):
      batch = to_device(batch, self.batch_sharding)
    with self.run.activation_context():
      return self._functions[name](params, batch)

  def embed_all(self, name: str, params, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """`name` ('image_embedding' or 'text_embedding') of every row of `inputs`, in order, in
    fixed-size padded batches; padding rows dropped."""
    outputs = []
    for start in range(0, len(inputs), batch_size):
      padded, count = pad_batch({"x": inputs[start:start + batch_size]}, batch_size)
      outputs.append(np.asarray(self(name, params, padded["x"]))[:count])
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
