"""Orbax checkpoints: a round trip onto a different mesh, and params-only restore for export."""

import jax
import numpy as np

from clipzoo_jax import checkpoint, optim, sharding, train
from clipzoo_jax.models import clip
from tests import helpers


def _state(config, mesh, seed):
  model = clip.CLIPTeX(config.model)
  rng = jax.random.PRNGKey(seed)
  abstract, _ = train.abstract_params_and_specs(model, config, rng)
  tx, _ = optim.make_optimizer(config.optim, abstract, 10)
  return train.create_state(model, tx, config, mesh, sharding.rules_from_config(), rng)


def test_round_trip_onto_a_different_mesh_and_params_only_restore(tmp_path):
  config = helpers.tiny_config()
  saved, _ = _state(config, sharding.make_mesh([2, 2, 2]), seed=0)
  workdir = str(tmp_path)
  checkpoint.save_config(workdir, config)
  checkpointer = checkpoint.Checkpointer(workdir, every=5)
  assert not checkpointer.save(3, saved, {"batches": 3})        # not a multiple of `every`
  assert checkpointer.save(5, saved, {"batches": 5, "seed": 0})
  checkpointer.wait()
  checkpointer.close()

  # restore onto 1 x 4 x 1 (other device count, other layout), from a differently seeded target
  mesh = sharding.make_mesh([1, 4, 1], devices=jax.devices()[:4])
  target, shardings = _state(config, mesh, seed=1)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          target, shardings)
  reader = checkpoint.Checkpointer(workdir, every=5)
  assert reader.latest_step() == 5
  restored, data_state = reader.restore(5, abstract)
  assert data_state == {"batches": 5, "seed": 0}
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  leaf = restored["params"]["img"]["encoder"]["block_0"]["mlp"]["fc"]["kernel"]
  assert leaf.sharding.mesh.devices.size == 4

  params, loaded_config = checkpoint.restore_params(workdir)
  assert loaded_config.model.image.width == config.model.image.width
  for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(params)):
    assert isinstance(b, np.ndarray)
    np.testing.assert_array_equal(np.asarray(a), b)
