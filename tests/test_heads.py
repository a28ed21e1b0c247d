"""The dense task heads (models/heads.py): what they cost in the train step (issue 11: at most 15%
of the CLIP step's FLOPs at the 41M-parameter reference shape and at B/16), their parameter
layout (the names every checkpoint and PyTorch export depends on), and the two pieces computed
differently from the textbook op: bilinear x2 as a stencil, the 1x1 output conv as a matmul."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipzoo_jax import aot
from clipzoo_jax import cli
from clipzoo_jax import config_base
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.models import clip
from clipzoo_jax.models import heads as heads_lib
from clipzoo_jax.models import variants

TASKS = ("seg", "depth", "normals", "det")


@pytest.mark.parametrize("variant,depth,batch", [("S/16", 6, 32), ("B/16", None, 32)])
def test_heads_add_at_most_15_percent_of_the_clip_step_flops(variant, depth, batch):
  """XLA's count of the whole unrolled step (forward, backward, AdamW), CLIPTeX with all four
  heads (150 seg / 80 det classes, 56 px labels) against the same step without heads."""
  clip = aot.step_flops(config_base.shape_config(variant, [], batch, depth=depth))
  cliptex = aot.step_flops(config_base.shape_config(variant, list(TASKS), batch, depth=depth))
  assert cliptex / clip - 1 <= 0.15, (variant, cliptex / clip)


def _head_shapes(model_config, width):
  specs = task_lib.head_specs(TASKS, model_config)
  module = heads_lib.TaskHeads(specs, hidden=model_config.heads.hidden,
                               upsample=model_config.heads.upsample)
  grid = jnp.zeros((1, 2, 2, width))
  params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), grid))["params"])
  return specs, jax.tree.map(lambda x: x.shape, params)


def test_head_parameters_at_the_reference_shape():
  """Per head: LayerNorm on the tower width, a 3x3 conv to `hidden` (32 by default), one 3x3 conv
  per x2 stage, a 1x1 conv to the head's channels; names as every checkpoint and export has them."""
  model_config = variants.model_config("S/16", tasks=TASKS)
  width, hidden = 384, 32
  assert model_config.heads.hidden == hidden and model_config.heads.upsample == 4
  specs, shapes = _head_shapes(model_config, width)
  assert sorted(shapes) == ["depth_head", "det_box_head", "det_heatmap_head", "normals_head",
                           "seg_head"]
  for spec in specs:
    assert shapes[spec.name] == {
        "ln": {"scale": (width,), "bias": (width,)},
        "conv_in": {"kernel": (3, 3, width, hidden), "bias": (hidden,)},
        "conv_up0": {"kernel": (3, 3, hidden, hidden), "bias": (hidden,)},
        "conv_up1": {"kernel": (3, 3, hidden, hidden), "bias": (hidden,)},
        "conv_out": {"kernel": (1, 1, hidden, spec.channels), "bias": (spec.channels,)},
    }, spec.name
  count = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
  per_stack = 2 * width + 9 * width * hidden + hidden + 2 * (9 * hidden * hidden + hidden)
  outputs = sum((hidden + 1) * spec.channels for spec in specs)  # 150 + 1 + 3 + 80 + 4 channels
  assert count == 5 * per_stack + outputs == 657_294


def test_configs_saved_with_64_wide_heads_keep_their_layout():
  """Runs and exports from before issue 11 stored hidden 64 in their config: same names, 64 wide."""
  model_config = variants.model_config("S/16", tasks=TASKS)
  model_config.heads.hidden = 64
  _, shapes = _head_shapes(model_config, 384)
  assert shapes["seg_head"]["conv_in"]["kernel"] == (3, 3, 384, 64)
  assert shapes["seg_head"]["conv_out"]["kernel"] == (1, 1, 64, 150)


@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (1, 1, 2, 4), (3, 14, 14, 8)])
def test_upsample2x_is_jax_bilinear_resize(shape):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  expected = jax.image.resize(x, (shape[0], 2 * shape[1], 2 * shape[2], shape[3]), "bilinear")
  np.testing.assert_allclose(heads_lib.upsample2x(x), expected, rtol=1e-6, atol=1e-6)


def test_pointwise_conv_is_flax_conv_with_the_same_parameters():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 6, 8)), jnp.float32)
  ours = heads_lib.PointwiseConv(7, bias_init=0.5)
  params = nn.unbox(ours.init(jax.random.PRNGKey(0), x))["params"]
  theirs = nn.Conv(7, (1, 1)).apply({"params": params}, x)
  assert jax.tree.map(jnp.shape, params) == {"kernel": (1, 1, 8, 7), "bias": (7,)}
  np.testing.assert_allclose(params["bias"], 0.5)
  np.testing.assert_allclose(ours.apply({"params": params}, x), theirs, rtol=1e-5, atol=1e-6)
  # the bias rides in the product as one more input row: its gradient and x's are nn.Conv's
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x)))
  for got, want in zip(jax.grad(loss(ours), (0, 1))(params, x),
                       jax.grad(loss(nn.Conv(7, (1, 1))), (0, 1))(params, x)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_heads_stems_computed_at_once_equal_each_heads_layer_norm_and_conv(dtype):
  """All heads' first LayerNorm + 3x3 conv run as one convolution (their LayerNorm scales folded
  into the kernels, their biases into a border-aware map). Against each head's own LayerNorm and
  zero-padded conv in float32, with random scales and biases, values and gradients (bfloat16:
  to bfloat16's precision, as the separate convolutions in bfloat16 are)."""
  rng = np.random.default_rng(0)
  width, hidden, heads = 12, 4, 3
  grid = jnp.asarray(rng.normal(1.0, 2.0, size=(2, 5, 5, width)), jnp.float32)
  params = [tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
                  [(width,), (width,), (3, 3, width, hidden), (hidden,)]) for _ in range(heads)]

  def separate(grid, params):
    mean = grid.mean(-1, keepdims=True)
    x = (grid - mean) / jnp.sqrt(jnp.square(grid - mean).mean(-1, keepdims=True) + 1e-5)
    return [jax.lax.conv_general_dilated(x * s + b, k, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + c
            for s, b, k, c in params]

  ours = lambda grid, params: heads_lib.stems(grid.astype(dtype), params, dtype)
  error = lambda got, want: float(np.max(np.abs(np.asarray(got, np.float32) - want))
                                  / np.max(np.abs(want)))
  bound = 1e-5 if dtype == jnp.float32 else 0.02
  for got, want in zip(ours(grid, params), separate(grid, params)):
    assert got.dtype == dtype and error(got, want) <= bound
  loss = lambda fn: lambda *a: sum(jnp.sum(jnp.sin(y.astype(jnp.float32))) for y in fn(*a))
  got = jax.grad(loss(ours), (0, 1))(grid, params)
  want = jax.grad(loss(separate), (0, 1))(grid, params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert error(a, b) <= (1e-4 if dtype == jnp.float32 else 0.25)


def _reference_head(params, grid, stages, final_upsample):
  """One head written with Flax's Conv, LayerNorm and jax.image.resize."""
  resize = lambda x: jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2],
                                          x.shape[3]), "bilinear")
  conv = lambda name, x, size=3: nn.Conv(params[name]["bias"].shape[0], (size, size)).apply(
      {"params": params[name]}, x)
  x = nn.LayerNorm(epsilon=1e-5).apply({"params": params["ln"]}, grid)
  x = jax.nn.gelu(conv("conv_in", x))
  for stage in range(stages):
    if final_upsample == "bilinear" and stage == stages - 1:
      x = resize(jax.nn.gelu(conv(f"conv_up{stage}", x)))
    else:
      x = jax.nn.gelu(conv(f"conv_up{stage}", resize(x)))
  return conv("conv_out", x, 1)


@pytest.mark.parametrize("final_upsample", ["bilinear", "conv"])
def test_final_upsample_places_the_last_conv_before_or_after_its_upsampling(final_upsample):
  """Same parameters either way; `bilinear` runs the last stage's conv before its x2, so no 3x3
  conv runs at the label resolution. Against Flax's layers and jax.image.resize."""
  model_config = variants.model_config("mu/4", image_size=12, tasks=("depth",))
  model_config.image.width, model_config.heads.hidden = 6, 4
  model_config.heads.final_upsample = final_upsample
  module = clip.task_heads(model_config)
  grid = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 6)), jnp.float32)
  params = nn.unbox(module.init(jax.random.PRNGKey(1), grid))["params"]
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                        params)
  ours = module.apply({"params": params}, grid)["depth"]
  assert ours.shape == (2, 12, 12)
  for mode in ("bilinear", "conv"):
    want = _reference_head(params["depth_head"], grid, 2, mode)[..., 0]
    close = np.allclose(ours, want, rtol=1e-5, atol=1e-5)
    assert close == (mode == final_upsample), mode


def test_by_default_only_seg_and_the_det_heatmap_run_a_conv_at_the_label_size():
  """"auto": the class maps with sharp edges and one-pixel peaks keep their last conv at the label
  size (on the demo, moving it a stage earlier raised the seg loss 2.6% and det 0.8%), the
  smooth outputs (depth, normals, box size and offset) run it a stage earlier."""
  model_config = variants.model_config("S/16", tasks=TASKS)
  assert model_config.heads.final_upsample == "auto"
  modes = {spec.name: spec.final_upsample for spec in task_lib.head_specs(TASKS, model_config)}
  assert modes == {"seg_head": "conv", "det_heatmap_head": "conv", "depth_head": "bilinear",
                   "normals_head": "bilinear", "det_box_head": "bilinear"}
  model_config.heads.final_upsample = "conv"
  assert {s.final_upsample for s in task_lib.head_specs(TASKS, model_config)} == {"conv"}


def test_a_config_saved_without_final_upsample_keeps_its_convs_at_the_label_size():
  """Runs saved before the option existed evaluate, export and resume as they trained; a wrong
  value names the config field."""
  model_config = variants.model_config("mu/4", image_size=12, tasks=TASKS)
  del model_config.heads["final_upsample"]
  assert {s.final_upsample for s in clip.task_heads(model_config).specs} == {"conv"}
  model_config.heads.final_upsample = "nearest"
  with pytest.raises(cli.UserError, match="model.heads.final_upsample: expected one of"):
    clip.task_heads(model_config)
