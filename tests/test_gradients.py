"""The memory levers of the loss change memory, never numbers: the chunked contrastive losses
equal the global ones, gradient accumulation equals the full batch (values and gradients, on 8
sharded devices), and SigLIP's sigmoid loss matches a NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipzoo_jax import cli
from clipzoo_jax import gradients
from clipzoo_jax import losses
from tests import helpers

RNG = np.random.default_rng(0)


def _sigmoid_reference(image, text, logit_scale, logit_bias):
  image = image / np.linalg.norm(image, axis=1, keepdims=True)
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  scale = min(math.exp(logit_scale), 100.0)
  total = 0.0
  for i in range(len(image)):
    for j in range(len(text)):
      z = 1.0 if i == j else -1.0
      total += math.log1p(math.exp(-z * (scale * image[i] @ text[j] + logit_bias)))
  return total / len(image)


def test_sigmoid_loss_matches_numpy_pair_by_pair():
  image, text = RNG.normal(size=(6, 8)), RNG.normal(size=(6, 8))
  for logit_scale, logit_bias in ((math.log(10.0), -10.0), (2.0, 1.5)):
    found = losses.sigmoid_contrastive_loss(jnp.asarray(image), jnp.asarray(text),
                                            jnp.asarray(logit_scale), jnp.asarray(logit_bias))
    np.testing.assert_allclose(found, _sigmoid_reference(image, text, logit_scale, logit_bias),
                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_chunked_contrastive_equals_global_in_value_and_gradient_on_8_devices(kind):
  """Embeddings sharded over 8 devices, as in the train step; chunks of 8 and 16 rows of 32."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("batch",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  image = jax.device_put(jnp.asarray(RNG.normal(size=(32, 16)), jnp.float32), rows)
  text = jax.device_put(jnp.asarray(RNG.normal(size=(32, 16)), jnp.float32), rows)
  outputs = {"image_embedding": image, "text_embedding": text, "logit_scale": jnp.asarray(2.3),
             "logit_bias": jnp.asarray(-3.0)}

  def loss(out, chunk):
    return losses.contrastive(out, {"contrastive": kind, "contrastive_chunk": chunk})

  want, want_grads = jax.jit(jax.value_and_grad(lambda o: loss(o, 0)))(outputs)
  for chunk in (8, 16):
    found, found_grads = jax.jit(jax.value_and_grad(lambda o: loss(o, chunk)))(outputs)
    np.testing.assert_allclose(found, want, rtol=1e-6)
    for name in outputs:
      np.testing.assert_allclose(found_grads[name], want_grads[name], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{kind} chunk {chunk}: d/d {name}")


def test_a_chunk_that_does_not_divide_the_batch_is_named():
  outputs = {"image_embedding": jnp.ones((6, 4)), "text_embedding": jnp.ones((6, 4)),
             "logit_scale": jnp.asarray(1.0)}
  with pytest.raises(cli.UserError, match="contrastive_chunk: 4 does not divide the batch of 6"):
    losses.contrastive(outputs, {"contrastive_chunk": 4})


def _setup(loss_kind="softmax", tasks=helpers.TASKS):
  config = helpers.tiny_config(tasks)
  config.global_batch_size = 16
  config.loss.contrastive = loss_kind
  if loss_kind == "sigmoid":
    config.model.logit_scale_init = losses.SIGLIP_LOGIT_SCALE_INIT
    config.model.logit_bias_init = losses.SIGLIP_LOGIT_BIAS_INIT
  run = helpers.run_on(config, [4, 2, 1])
  state = run.init_state()
  batch = run.global_batch(run.synthetic_batch(seed=1))
  return run, state, batch


def test_gradient_accumulation_equals_the_full_batch():
  """2 micro-batches (GradCache) against the whole batch of 16 on a (4 data, 2 fsdp) mesh of 8
  devices, with all four task heads: every loss and every parameter gradient."""
  run, state, batch = _setup()
  config = run.config
  apply_fn = lambda p, b: run.model.apply({"params": p}, b["image"], b["tokens"])
  args = (tuple(config.model.heads.tasks), dict(config.loss.weights), config.loss.to_dict())
  micro = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
  constrain = lambda x: jax.lax.with_sharding_constraint(x, micro)
  with run.activation_context():
    (_, want), want_grads = jax.jit(
        lambda p, b: gradients.full_batch(apply_fn, p, b, *args))(state["params"], batch)
    for steps in (2,):
      (_, found), found_grads = jax.jit(lambda p, b: gradients.accumulated(
          apply_fn, p, b, *args, steps, constrain))(state["params"], batch)
      assert set(found) == set(want)
      for name in want:
        np.testing.assert_allclose(found[name], want[name], rtol=2e-5, err_msg=name)
      flat_want = jax.tree_util.tree_flatten_with_path(want_grads)[0]
      flat_found = jax.tree.leaves(found_grads)
      scale = max(float(jnp.max(jnp.abs(g))) for _, g in flat_want)
      for (path, w), f in zip(flat_want, flat_found, strict=True):
        np.testing.assert_allclose(f, w, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=f"{steps} micro-batches: {jax.tree_util.keystr(path)}")


def test_an_accumulated_train_step_equals_the_full_batch_step():
  """Through the real train step (optimizer update included), with SigLIP's loss and its learned
  bias: the state after one step and the logged metrics do not depend on
  config.grad_accum_steps."""
  run, state, batch = _setup("sigmoid", tasks=("seg",))
  config = run.config.copy_and_resolve_references()
  config.grad_accum_steps = 2
  accumulated_run = helpers.run_on(config, [4, 2, 1])
  copy = jax.tree.map(jnp.copy, state)
  new_full, metrics_full = run.train_step(state, batch)
  new_accum, metrics_accum = accumulated_run.train_step(copy, batch)
  for name in metrics_full:
    np.testing.assert_allclose(metrics_accum[name], metrics_full[name], rtol=1e-4, err_msg=name)
  for want, found in zip(jax.tree.leaves(new_full["params"]), jax.tree.leaves(new_accum["params"])):
    np.testing.assert_allclose(found, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"grad_accum_steps": 4}, "grad_accum_steps 4 x the data-parallel size 8"),
    ({"grad_accum_steps": 0}, "grad_accum_steps must be >= 1"),
    ({"loss.contrastive_chunk": 5}, "contrastive_chunk 5 does not divide"),
    ({"loss.contrastive": "sigmoid"}, "needs the learned logit bias"),
    ({"loss.contrastive": "hinge"}, "expected one of"),
])
def test_bad_loss_levers_are_named_before_compiling(change, message):
  config = helpers.tiny_config()
  config.global_batch_size = 16
  for key, value in change.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  with pytest.raises(cli.UserError, match=message):
    helpers.run_on(config, [4, 2, 1])
