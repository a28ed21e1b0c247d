"""benchmarks/step_profile.py: a real jax.profiler trace of a jitted step, attributed to the
step's parts through the compiled HLO's source names."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_step_profile():
  spec = importlib.util.spec_from_file_location(
      "step_profile", os.path.join(ROOT, "benchmarks", "step_profile.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_traced_step_is_attributed_to_its_parts_and_directions(tmp_path):
  """`img` does ~60x the matmul work of `txt`: the profile must say so, split forward from
  backward, find the loss and the optimizer, and account for every op it timed."""
  step_profile = load_step_profile()
  tx = optax.adamw(1e-3)

  def model(params, x, t):
    with jax.named_scope("img"):
      h = x
      for w in params["img"]:
        h = jnp.tanh(h @ w)
    with jax.named_scope("txt"):
      g = jnp.tanh(t @ params["txt"])
    return h, g

  def loss_fn(params, x, t):
    h, g = model(params, x, t)
    with jax.named_scope("loss"):
      return jnp.mean(h ** 2) + jnp.mean(g ** 2)

  def step(state, x, t):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, x, t)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return (params, opt_state), loss

  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  params = {"img": [jax.random.normal(k, (384, 384)) * 0.05 for k in keys[:4]],
            "txt": jax.random.normal(keys[4], (96, 96)) * 0.1}
  x, t = jax.random.normal(keys[5], (512, 384)), jnp.ones((64, 96))
  state = (params, tx.init(params))
  compiled = jax.jit(step, donate_argnums=0).lower(state, x, t).compile()
  state, loss = compiled(state, x, t)
  jax.block_until_ready(loss)

  class Stepper:  # profile_step calls it as it calls a compiled train step: (state, batch)
    as_text = compiled.as_text

    def __call__(self, state, batch):
      return compiled(state, *batch)

  state, summary = step_profile.profile_step(Stepper(), state, (x, t), str(tmp_path), steps=2)
  by_part = summary["ms_per_step_by_part"]
  assert summary["unmatched_ms_per_step"] == 0
  total = summary["total_ms_per_step"]
  for key in ("part", "direction", "kind"):
    assert np.isclose(sum(summary[f"ms_per_step_by_{key}"].values()), total, rtol=1e-3), key
  assert {"img", "txt", "loss", "optimizer"} <= set(by_part), by_part
  assert by_part["img"] > 4 * by_part["txt"], by_part
  assert by_part["img"] > 0.5 * total, by_part
  assert set(summary["ms_per_step_by_direction"]) == {"forward", "backward"}
  assert summary["ms_per_step_by_kind"]["matmul"] > 0
  # the saved trace summarized again by the command the README gives
  result = subprocess.run(
      [sys.executable, "benchmarks/step_profile.py", str(tmp_path),
       str(tmp_path / "train_step.hlo.txt.gz"), "--steps", "2"],
      cwd=ROOT, capture_output=True, text=True, check=True)
  assert "by part: img" in result.stdout
  assert json.loads(result.stdout.splitlines()[-1]) == summary


def test_an_op_without_source_names_takes_its_producers_part_and_backward_direction():
  """XLA leaves some weight-gradient convolutions without op names: such an op belongs to the
  part of the ops it reads, and consuming a gradient makes it backward."""
  step_profile = load_step_profile()
  hlo = """HloModule m

%fused_conv (p0: f32[4,8,8,3], p1: f32[4,8,8,5]) -> f32[3,3,3,5] {
  %p0 = f32[4,8,8,3]{3,2,1,0} parameter(0)
  %p1 = f32[4,8,8,5]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[3,3,3,5]{3,2,1,0} convolution(%p0, %p1), window={size=8x8 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf
}

ENTRY %main (a: f32[4,8,8,3], b: f32[4,8,8,5]) -> f32[3,3,3,5] {
  %a = f32[4,8,8,3]{3,2,1,0} parameter(0)
  %b = f32[4,8,8,5]{3,2,1,0} parameter(1)
  %act = f32[4,8,8,3]{3,2,1,0} negate(%a), metadata={op_name="jit(step)/jvp(M)/heads/seg/conv_up1/mul"}
  %grad = f32[4,8,8,5]{3,2,1,0} negate(%b), metadata={op_name="jit(step)/transpose(jvp(M))/heads/seg/conv_up1/add"}
  ROOT %fusion.7 = f32[3,3,3,5]{3,2,1,0} fusion(%act, %grad), kind=kOutput, calls=%fused_conv
}
"""
  instructions, computations = step_profile.parse_hlo(hlo)
  assert step_profile.classify(instructions["fusion.7"], computations, instructions) == (
      "heads", "backward", "convolution")
  assert step_profile.classify(instructions["act"], computations, instructions) == (
      "heads", "forward", "elementwise")
