"""The loss of a batch and its gradient for the train step, computed over the whole batch at once
or over `config.grad_accum_steps` micro-batches, with the same value and gradient either way.

Micro-batches cannot simply average their own losses: the contrastive loss compares every image
with every caption of the *global* batch, and each task loss is normalized by its count of valid
pixels in the whole batch. So accumulation follows GradCache (Gao et al. 2021):

  1. forward every micro-batch without keeping activations: embeddings, and each task's loss
     denominator (a count that depends on the labels only);
  2. the contrastive loss of all the embeddings together, and its gradient with respect to them
     (B x E numbers, small);
  3. forward again, one micro-batch at a time, and backpropagate the surrogate
     <d loss / d embeddings, embeddings> + sum_t w_t * numerator_t / denominator_t,
     whose parameter gradient is exactly the micro-batch's share of the full gradient.

Activations are held for one micro-batch at a time, at the price of one more forward pass.
Micro-batch j takes rows j, j + k, j + 2k, ... of the batch, so each device's rows stay on that
device: a batch sharded over the data axes splits without moving data.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from clipzoo_jax import losses

# The model outputs the contrastive loss reads: per-example embeddings, and the shared scalars.
EMBEDDINGS = ("image_embedding", "text_embedding")
SCALARS = ("logit_scale", "logit_bias")


def full_batch(apply_fn: Callable, params, batch: Mapping, tasks, weights: Mapping[str, float],
               loss_config: Mapping):
  """((total, metrics), grads) of the whole batch in one pass."""
  def loss_fn(p):
    return losses.total_loss(apply_fn(p, batch), batch, tasks, weights, loss_config)
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def split(batch: Mapping, steps: int, constrain: Callable = lambda x: x) -> dict:
  """(B, ...) leaves -> (steps, B / steps, ...): micro-batch j holds rows j, j + steps, ...;
  `constrain` pins the sharding of each micro-batch's rows (the batch's own)."""
  def one(x):
    micro = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    return constrain(micro)
  return {name: one(value) for name, value in batch.items()}


def accumulated(apply_fn: Callable, params, batch: Mapping, tasks, weights: Mapping[str, float],
                loss_config: Mapping, steps: int, constrain: Callable = lambda x: x,
                unroll: bool = False):
  """((total, metrics), grads) equal to `full_batch`'s, holding one micro-batch of activations
  at a time (module docstring). `unroll` writes the micro-batch loops out (XLA's cost analysis
  counts a loop body once; the AOT tool unrolls to count every micro-batch)."""
  losses.check_weights(tasks, weights)
  micro = split(batch, steps, constrain)

  def forward(_, micro_batch):  # pass 1: what the whole-batch losses need, no activations kept
    outputs = apply_fn(params, micro_batch)
    denominators = {name: terms[1] for name, terms in
                    losses.task_terms(outputs, micro_batch, tasks, loss_config).items()}
    return None, ({k: outputs[k] for k in EMBEDDINGS}, denominators)

  unroll = steps if unroll else 1
  _, (embeddings, denominators) = jax.lax.scan(forward, None, micro, unroll=unroll)
  denominators = {name: jnp.sum(count) for name, count in denominators.items()}
  scalars = {k: params[k] for k in SCALARS if k in params}

  def contrastive_of(embedded, shared):
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in embedded.items()}
    return losses.contrastive({**flat, **shared}, loss_config)

  contrastive, (embedding_grads, scalar_grads) = jax.value_and_grad(
      contrastive_of, argnums=(0, 1))(embeddings, scalars)

  def backward(grads, inputs):  # pass 3: one micro-batch's share of the full gradient
    micro_batch, cotangents = inputs

    def surrogate(p):
      outputs = apply_fn(p, micro_batch)
      numerators = {name: terms[0] for name, terms in
                    losses.task_terms(outputs, micro_batch, tasks, loss_config).items()}
      pulled = sum(jnp.sum(jax.lax.stop_gradient(cotangents[k]) * outputs[k]) for k in EMBEDDINGS)
      tasks_part = sum((weights[name] * numerator / jnp.maximum(denominators[name], 1.0)
                        for name, numerator in numerators.items()), jnp.zeros(()))
      return pulled + tasks_part, numerators

    micro_grads, numerators = jax.grad(surrogate, has_aux=True)(params)
    return jax.tree.map(jnp.add, grads, micro_grads), numerators

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, numerators = jax.lax.scan(backward, zeros, (micro, embedding_grads), unroll=unroll)
  grads = {**grads, **{k: grads[k] + g for k, g in scalar_grads.items()}}
  terms = {name: (jnp.sum(numerators[name]), denominators[name]) for name in denominators}
  return losses.combine(contrastive, terms, weights), grads


def loss_and_grads(apply_fn: Callable, params, batch: Mapping, tasks, weights: Mapping[str, float],
                   loss_config: Mapping, steps: int = 1, constrain: Callable = lambda x: x,
                   unroll: bool = False):
  """`full_batch` for one step, `accumulated` for several."""
  if steps <= 1:
    return full_batch(apply_fn, params, batch, tasks, weights, loss_config)
  return accumulated(apply_fn, params, batch, tasks, weights, loss_config, steps, constrain,
                     unroll)
