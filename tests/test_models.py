"""Model behaviour users rely on: shapes, causal text pooling at EOS, scan == unscanned, logical
axes on every parameter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from clipzoo_jax.models import clip, variants
from tests import helpers


def _tokens(config, rng, eos_at=5):
  length, vocab = config.model.text.context_length, config.model.text.vocab_size
  tokens = rng.integers(1, vocab - 1, size=(2, length))
  tokens[:, eos_at] = vocab - 1   # end-of-text: the largest id, pooled by argmax
  tokens[:, eos_at + 1:] = 0      # padding
  return tokens


def test_output_shapes_follow_config():
  config = helpers.tiny_config()
  model, params = helpers.init_params(config)
  rng = np.random.default_rng(0)
  out = model.apply({"params": params}, jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32),
                    jnp.asarray(_tokens(config, rng)))
  embed = config.model.embed_dim
  assert out["image_embedding"].shape == out["text_embedding"].shape == (2, embed)
  assert out["heads"]["seg"].shape == (2, 16, 16, config.model.heads.num_seg_classes)
  assert out["heads"]["depth"].shape == (2, 16, 16)
  np.testing.assert_allclose(np.linalg.norm(out["heads"]["normals"], axis=-1), 1.0, rtol=1e-5)
  assert out["heads"]["det_heatmap"].shape == (2, 16, 16, config.model.heads.num_det_classes)


def test_text_embedding_ignores_tokens_after_eos_but_not_before():
  config = helpers.tiny_config(tasks=())
  model, params = helpers.init_params(config)
  rng = np.random.default_rng(1)
  tokens = _tokens(config, rng)
  encode = lambda t: model.apply({"params": params}, jnp.asarray(t), method=model.encode_text)
  base = encode(tokens)
  after = tokens.copy(); after[:, 7] = 3
  before = tokens.copy(); before[:, 2] = (before[:, 2] % 10) + 11
  np.testing.assert_allclose(encode(after), base, atol=1e-6)
  assert np.abs(np.asarray(encode(before)) - np.asarray(base)).max() > 1e-4


def test_eos_token_id_pools_at_first_eos_instead_of_argmax():
  config = helpers.tiny_config(tasks=())
  config.model.text.eos_token_id = 7
  tokens = np.array([[1, 9, 7, 60, 7, 0, 0, 0]])
  from clipzoo_jax.models import text
  assert int(text.eos_positions(jnp.asarray(tokens), 7)[0]) == 2
  assert int(text.eos_positions(jnp.asarray(tokens), None)[0]) == 3


def test_scanned_layers_compute_the_same_function():
  config = helpers.tiny_config(tasks=("seg",))
  model, params = helpers.init_params(config)
  scanned_config = helpers.tiny_config(tasks=("seg",))
  scanned_config.model.scan_layers = True
  scanned_config.model.remat = "full"
  scanned = clip.CLIPTeX(scanned_config.model)

  def stack(encoder):
    blocks = [encoder[f"block_{i}"] for i in range(len(encoder))]
    return {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}

  scanned_params = dict(params)
  for tower in ("img", "txt"):
    scanned_params[tower] = {**params[tower], "encoder": stack(params[tower]["encoder"])}
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  tokens = jnp.asarray(_tokens(config, rng))
  a = model.apply({"params": params}, images, tokens)
  b = scanned.apply({"params": scanned_params}, images, tokens)
  for key in ("image_embedding", "text_embedding"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a["heads"]["seg"], b["heads"]["seg"], rtol=1e-5, atol=1e-6)


def test_every_parameter_has_logical_axes_of_its_rank():
  config = helpers.tiny_config()
  model = clip.CLIPTeX(config.model)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                            jnp.zeros((1, 8), jnp.int32)))["params"]
  for path, leaf in flatten_dict(boxed).items():
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{'/'.join(path)} has no logical axes"
    assert len(leaf.names) == len(leaf.value.shape), "/".join(path)


@pytest.mark.parametrize("variant,width,depth,patch,size", [
    ("B/16", 768, 12, 16, 224), ("B/32", 768, 12, 32, 224), ("L/14", 1024, 24, 14, 224),
    ("L/14@336", 1024, 24, 14, 336), ("Ti/16", 192, 12, 16, 224), ("S/16", 384, 12, 16, 224)])
def test_variants_parse_to_openai_shapes(variant, width, depth, patch, size):
  cfg = variants.model_config(variant)
  assert (cfg.image.width, cfg.image.depth, cfg.image.patch_size, cfg.image.image_size) == (
      width, depth, patch, size)
  with pytest.raises(ValueError, match="SIZE/PATCH"):
    variants.model_config("XL/16")


def test_uint8_pixels_are_clip_normalized_on_the_device():
  """The loader sends uint8 images; the model's output equals feeding the NumPy-normalized
  float image (OpenAI's mean and std over [0, 1])."""
  from clipzoo_jax.data.normalization import CLIP_MEAN, CLIP_STD
  config = helpers.tiny_config(tasks=("seg",))
  model, params = helpers.init_params(config)
  rng = np.random.default_rng(3)
  pixels = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  normalized = (pixels / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  tokens = jnp.asarray(_tokens(config, rng))
  a = model.apply({"params": params}, jnp.asarray(pixels), tokens)
  b = model.apply({"params": params}, jnp.asarray(normalized, jnp.float32), tokens)
  np.testing.assert_allclose(a["image_embedding"], b["image_embedding"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a["heads"]["seg"], b["heads"]["seg"], rtol=1e-5, atol=1e-5)


def test_attention_softmax_equals_jax_softmax_and_keeps_bfloat16_probabilities():
  """The attention softmax's custom backward equals autodiff of jax.nn.softmax in float32; in
  bfloat16 it returns (and saves) bfloat16 probabilities whose gradient stays within bf16
  rounding of the float32 one."""
  from clipzoo_jax.models import transformer as tfm
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 7)) * 3, jnp.float32)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 5, 7)), jnp.float32)
  loss = lambda fn: lambda x: jnp.sum(fn(x).astype(jnp.float32) * weights)
  reference = lambda x: jax.nn.softmax(x, axis=-1)
  np.testing.assert_allclose(tfm.softmax_keeping_dtype(logits), reference(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(loss(tfm.softmax_keeping_dtype))(logits),
                             jax.grad(loss(reference))(logits), rtol=1e-5, atol=1e-7)
  half = logits.astype(jnp.bfloat16)
  assert tfm.softmax_keeping_dtype(half).dtype == jnp.bfloat16
  grad_half = jax.grad(loss(tfm.softmax_keeping_dtype))(half)
  assert grad_half.dtype == jnp.bfloat16
  np.testing.assert_allclose(grad_half.astype(jnp.float32), jax.grad(loss(reference))(logits),
                             atol=0.02)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("implementation", ["heads_first", "einsum"])
def test_attention_implementations_equal_jax_reference_attention(implementation, causal):
  """Each XLA attention layout computes jax.nn.dot_product_attention (JAX's own reference),
  forward and gradient, with and without the causal mask of the text tower."""
  from clipzoo_jax.models import transformer as tfm
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
  module = tfm.Attention(num_heads=4, causal=causal, implementation=implementation)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), x)["params"])

  def reference(p, x):
    project = lambda n: jnp.einsum("bld,dhk->blhk", x, p[n]["kernel"]) + p[n]["bias"]
    out = jax.nn.dot_product_attention(project("query"), project("key"), project("value"),
                                       is_causal=causal, implementation="xla")
    return jnp.einsum("blhk,hkd->bld", out, p["out"]["kernel"]) + p["out"]["bias"]

  ours = lambda params, x: module.apply({"params": params}, x)
  np.testing.assert_allclose(ours(params, x), reference(params, x), rtol=1e-5, atol=1e-6)
  loss = lambda fn: lambda params, x: jnp.sum(jnp.sin(fn(params, x)))
  got, want = (jax.grad(loss(fn), argnums=(0, 1))(params, x) for fn in (ours, reference))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_fused_attention_equals_unpadded(causal):
  """The cuDNN path pads the sequence (197 -> 200 in a B/16 ViT) and masks the padded keys; run
  here through the same jax.nn.dot_product_attention call with XLA, it must equal attention over
  the unpadded sequence, forward and gradient."""
  from clipzoo_jax.models import transformer as tfm
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 13, 3, 8)), jnp.float32) for _ in range(3))
  padded = lambda q, k, v: tfm.fused_attention(q, k, v, causal, "xla")  # 13 -> 16
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda fn: lambda *a: jnp.sum(jnp.cos(fn(*a)))
  for a, b in zip(jax.grad(loss(padded), (0, 1, 2))(q, k, v),
                  jax.grad(loss(plain), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_attention_picks_the_layout_measured_best_on_each_platform():
  from clipzoo_jax import cli
  from clipzoo_jax.models import transformer as tfm
  resolve = tfm.resolve_attention
  assert resolve("auto", "cpu", jnp.float32, 64) == "heads_first"
  assert resolve("auto", "tpu", jnp.bfloat16, 64) == "heads_first"
  assert resolve("auto", "gpu", jnp.bfloat16, 64) == "cudnn"
  assert resolve("auto", "gpu", jnp.float32, 64) == "heads_first"   # cuDNN's kernel: half only
  assert resolve("auto", "gpu", jnp.bfloat16, 160) == "heads_first"  # head_dim over 128
  assert resolve("einsum", "cpu", jnp.float32, 64) == "einsum"
  with pytest.raises(cli.UserError, match="model.attention 'cudnn' needs a GPU.*platform 'cpu'"):
    resolve("cudnn", "cpu", jnp.bfloat16, 64)
  with pytest.raises(cli.UserError, match="model.attention: expected one of.*found 'flash'"):
    resolve("flash", "cpu", jnp.float32, 64)


def test_the_aot_platform_not_the_host_decides_auto_attention():
  """An AOT check for a GPU or TPU traces on a CPU host: what gets compiled must be the target's
  choice, so the model's `platform` (run.setup passes the mesh devices' platform) overrides the
  host backend."""
  config = helpers.tiny_config([])
  config.model.dtype = "bfloat16"
  images = jnp.zeros((1, config.model.image.image_size, config.model.image.image_size, 3))
  tokens = jnp.zeros((1, config.model.text.context_length), jnp.int32)
  params = clip.CLIPTeX(config.model).init(jax.random.PRNGKey(0), images, tokens)["params"]
  lowered = lambda platform: jax.jit(lambda p: clip.CLIPTeX(config.model, platform=platform).apply(
      {"params": p}, images, tokens)).lower(params).as_text()
  assert "cudnn" not in lowered("cpu")
  with pytest.raises(RuntimeError, match="cuDNN"):  # this host has none: the GPU path was taken
    lowered("gpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_with_its_written_backward_equals_the_plain_formula(dtype):
  """transformer.layer_norm's hand-written backward pass against JAX's derivative of the plain
  float32 formula: input, scale and bias gradients, for a (B, L, D) and a (B, g, g, D) input (the
  heads normalize a patch grid), in float32 and with bfloat16 activations."""
  from clipzoo_jax.models import transformer as tfm
  rng = np.random.default_rng(3)

  def plain(x, scale, bias):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias

  for shape in [(3, 5, 24), (2, 3, 3, 16)]:
    x = jnp.asarray(rng.normal(2.0, 3.0, size=shape), dtype)
    scale = jnp.asarray(rng.normal(1.0, 0.5, size=shape[-1:]), jnp.float32)
    bias = jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)
    ours = lambda x, s, b: tfm.layer_norm(x, s, b, 1e-5)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(ours(x, scale, bias), plain(x, scale, bias), rtol=1e-5, atol=1e-5)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)) * jnp.arange(shape[-1]))
    got = jax.grad(loss(ours), (0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(plain), (0, 1, 2))(x, scale, bias)
    assert got[0].dtype == x.dtype
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tolerance)


@pytest.mark.parametrize("size,patch", [(32, 8), (30, 8), (28, 14)])
def test_patch_embedding_matmul_equals_the_strided_convolution(size, patch):
  """The patch embedding computed as one matmul is nn.Conv's p x p stride-p VALID convolution
  (the parameter it replaces, same name and shape): outputs and the kernel's gradient, also when
  the image is not a multiple of the patch (the remainder is dropped, as VALID does)."""
  from clipzoo_jax.models import vit
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, size, size, 3)), jnp.float32)
  ours = vit.PatchEmbedding(16, patch)
  conv = nn.Conv(16, (patch, patch), strides=(patch, patch), use_bias=False, padding="VALID")
  params = ours.init(jax.random.PRNGKey(0), images)
  assert jax.tree.map(jnp.shape, nn.unbox(params)) == jax.tree.map(
      jnp.shape, conv.init(jax.random.PRNGKey(0), images))
  params = nn.unbox(params)
  loss = lambda module, p: jnp.sum(jnp.sin(module.apply(p, images)))
  np.testing.assert_allclose(ours.apply(params, images), conv.apply(params, images),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda p: loss(ours, p))(params)["params"]["kernel"],
                             jax.grad(lambda p: loss(conv, p))(params)["params"]["kernel"],
                             rtol=1e-4, atol=1e-4)
