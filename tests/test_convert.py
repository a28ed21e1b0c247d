"""PyTorch interop of the towers: random-weight Hugging Face CLIPModels of several shapes imported
and run against transformers; OpenAI (TorchScript) and open_clip state dicts built from them by an
independent name mapping; bit-exact round trips; tampered files; position-embedding resizing
against torch.nn.functional.interpolate and HF's own interpolate_pos_encoding."""

import json
import os
import re

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from safetensors import safe_open
from safetensors.torch import save_file as save_torch_safetensors

from clipzoo_jax import convert
from clipzoo_jax.convert import hf, layout, pos_embed, tensor_files
from clipzoo_jax.models import clip, variants

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TOLERANCE = 1e-4  # relative, fp32
OUR_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
CASES = {
    # non-default widths, heads, MLP ratio, context; legacy argmax pooling (eos_token_id 2)
    "quick_gelu": (dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=3, image_size=32, patch_size=8,
                        hidden_act="quick_gelu"),
                   dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                        num_attention_heads=5, max_position_embeddings=12, vocab_size=99,
                        hidden_act="quick_gelu", eos_token_id=2), 24),
    # exact gelu, pooling at the first eos id, non-default LayerNorm eps, odd grid
    "gelu": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=24, patch_size=4, hidden_act="gelu", layer_norm_eps=1e-6),
             dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=9, vocab_size=64, hidden_act="gelu", eos_token_id=63,
                  layer_norm_eps=1e-6), 16),
    "gelu_tanh": (dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, image_size=16, patch_size=4,
                       hidden_act="gelu_pytorch_tanh"),
                  dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=7, vocab_size=50,
                       hidden_act="gelu_pytorch_tanh", eos_token_id=49), 8),
}


def random_hf_model(case: str, seed: int = 0) -> transformers.CLIPModel:
  """Every weight random (LayerNorm scales around 1), so no transposition error can hide."""
  vision, text, projection = CASES[case]
  config = transformers.CLIPConfig(text_config=dict(text, bos_token_id=0, pad_token_id=1),
                                   vision_config=vision, projection_dim=projection)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = "norm" in name and name.endswith(".weight")
      p.copy_(torch.randn_like(p) * 0.05 + (1.0 if is_scale else 0.0))
    model.logit_scale.fill_(2.3)
  return model


def our_config(case: str, **changes):
  """The run config a user would write for the case's shapes, independently of the converter."""
  vision, text, projection = CASES[case]
  cfg = variants.model_config("mu/8", image_size=vision["image_size"],
                              vocab_size=text["vocab_size"],
                              context_length=text["max_position_embeddings"])
  cfg.embed_dim = projection
  for ours, theirs in ((cfg.image, vision), (cfg.text, text)):
    ours.width, ours.depth = theirs["hidden_size"], theirs["num_hidden_layers"]
    ours.num_heads, ours.mlp_dim = theirs["num_attention_heads"], theirs["intermediate_size"]
    ours.activation = OUR_ACTIVATION[theirs["hidden_act"]]
    ours.layer_norm_eps = theirs.get("layer_norm_eps", 1e-5)
  cfg.image.patch_size = vision["patch_size"]
  cfg.text.eos_token_id = None if text["eos_token_id"] == 2 else text["eos_token_id"]
  for key, value in changes.items():
    section, _, field = key.rpartition(".")
    (cfg[section] if section else cfg)[field] = value
  return cfg


def random_inputs(cfg, batch=3, seed=1, image_size=None, length=None):
  rng = np.random.default_rng(seed)
  size = image_size or cfg.image.image_size
  length = length or cfg.text.context_length
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  vocab, eos = cfg.text.vocab_size, cfg.text.eos_token_id
  pooled = vocab - 1 if eos is None else eos
  tokens = rng.integers(0, vocab - 1, size=(batch, length))
  tokens[tokens == pooled] = 1
  tokens[np.arange(batch), [length - 1, 2, 4][:batch]] = pooled
  return images, tokens


def hf_outputs(model, images, tokens, **kwargs):
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  ids = torch.from_numpy(tokens.astype(np.int64))
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels, **kwargs)
    return {
        "image": model.get_image_features(pixel_values=pixels, **kwargs).pooler_output.numpy(),
        "text": model.get_text_features(input_ids=ids).pooler_output.numpy(),
        "logits": out.logits_per_image.numpy(),
        "patches": out.vision_model_output.last_hidden_state[:, 1:].numpy(),
    }


def jax_outputs(params, cfg, images, tokens):
  model = clip.CLIPTeX(cfg)

  def run(params, images, tokens):
    out = model.apply({"params": params}, images, tokens)
    _, patches = model.apply({"params": params}, images, method=model.encode_image)
    return out, patches

  out, patches = jax.jit(run)(params, images, tokens)
  image, text = np.asarray(out["image_embedding"]), np.asarray(out["text_embedding"])
  normed = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  return {"image": image, "text": text,
          "logits": np.exp(float(out["logit_scale"])) * normed(image) @ normed(text).T,
          "patches": np.asarray(patches).reshape(len(images), -1, cfg.image.width)}


def assert_relative_close(found, expected, what):
  error = np.max(np.abs(found - expected)) / np.max(np.abs(expected))
  assert error <= TOLERANCE, f"{what}: relative error {error:.3g} > {TOLERANCE}"


def assert_all_close(ours, theirs):
  for key in theirs:
    assert_relative_close(ours[key], theirs[key], key)


def assert_trees_equal(a, b):
  flat_a, flat_b = layout.flatten(a), layout.flatten(b)
  assert sorted(flat_a) == sorted(flat_b)
  for key in flat_a:
    assert np.array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key])), key


@pytest.fixture(scope="module")
def quick_gelu_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("hf_quick_gelu"))
  random_hf_model("quick_gelu").save_pretrained(folder)
  return folder


@pytest.mark.parametrize("case,scan", [("quick_gelu", False), ("gelu", True), ("gelu_tanh", False)])
def test_hf_folder_import_matches_transformers(case, scan, tmp_path):
  model = random_hf_model(case)
  model.save_pretrained(tmp_path)
  cfg = our_config(case, scan_layers=scan)
  params = convert.load_pretrained(str(tmp_path), cfg)
  if scan:
    assert params["img"]["encoder"]["blocks"]["ln_1"]["scale"].shape[0] == cfg.image.depth
  images, tokens = random_inputs(cfg)
  assert_all_close(jax_outputs(params, cfg, images, tokens), hf_outputs(model, images, tokens))
  # The config read from config.json is the one written by hand above.
  read = convert.model_config_from_source(str(tmp_path))
  for field in ("embed_dim",):
    assert read[field] == cfg[field]
  for tower in ("image", "text"):
    for field, value in cfg[tower].items():
      assert read[tower][field] == value, f"{tower}.{field}"


def _openai_state_dict(hf_state: dict) -> dict:
  """HF CLIPModel names -> OpenAI CLIP names, written out independently of layout.py."""
  out = {}
  for prefix, ours in (("vision_model.", "visual."), ("text_model.", "")):
    layers = sorted({int(k.split(".")[3]) for k in hf_state if k.startswith(prefix + "encoder.")})
    for i in layers:
      src, dst = f"{prefix}encoder.layers.{i}.", f"{ours}transformer.resblocks.{i}."
      for kind in ("weight", "bias"):
        out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
            [hf_state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[f"{dst}attn.out_proj.{kind}"] = hf_state[f"{src}self_attn.out_proj.{kind}"]
        out[f"{dst}ln_1.{kind}"] = hf_state[f"{src}layer_norm1.{kind}"]
        out[f"{dst}ln_2.{kind}"] = hf_state[f"{src}layer_norm2.{kind}"]
        out[f"{dst}mlp.c_fc.{kind}"] = hf_state[f"{src}mlp.fc1.{kind}"]
        out[f"{dst}mlp.c_proj.{kind}"] = hf_state[f"{src}mlp.fc2.{kind}"]
  for kind in ("weight", "bias"):
    out[f"visual.ln_pre.{kind}"] = hf_state[f"vision_model.pre_layrnorm.{kind}"]
    out[f"visual.ln_post.{kind}"] = hf_state[f"vision_model.post_layernorm.{kind}"]
    out[f"ln_final.{kind}"] = hf_state[f"text_model.final_layer_norm.{kind}"]
  out["visual.conv1.weight"] = hf_state["vision_model.embeddings.patch_embedding.weight"]
  out["visual.class_embedding"] = hf_state["vision_model.embeddings.class_embedding"]
  out["visual.positional_embedding"] = hf_state["vision_model.embeddings.position_embedding.weight"]
  out["visual.proj"] = hf_state["visual_projection.weight"].T.contiguous()
  out["token_embedding.weight"] = hf_state["text_model.embeddings.token_embedding.weight"]
  out["positional_embedding"] = hf_state["text_model.embeddings.position_embedding.weight"]
  out["text_projection"] = hf_state["text_projection.weight"].T.contiguous()
  out["logit_scale"] = hf_state["logit_scale"]
  return {k: v.detach().clone().contiguous() for k, v in out.items()}


class _Holder(torch.nn.Module):
  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def _save_torchscript(state: dict, path: str, input_resolution: int) -> None:
  """An archive shaped like OpenAI's (nested modules, an int attribute, attn_mask buffers)."""
  root = _Holder()
  for name, value in state.items():
    *parents, leaf = name.split(".")
    module = root
    for part in parents:
      if not hasattr(module, part):
        module.add_module(part, _Holder())
      module = getattr(module, part)
    module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
  root.input_resolution = input_resolution
  root.transformer.resblocks.get_submodule("0").register_buffer("attn_mask", torch.ones(3, 3))
  torch.jit.script(root).save(path)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_openai_and_open_clip_state_dicts_match_transformers(quick_gelu_folder, tmp_path):
  model = transformers.CLIPModel.from_pretrained(quick_gelu_folder).eval()
  state = _openai_state_dict(model.state_dict())
  cfg = our_config("quick_gelu")
  expected = convert.load_pretrained(quick_gelu_folder, cfg)

  files = {
      "ViT-tiny.pt": lambda p: _save_torchscript(state, p, 32),
      "plain.pt": lambda p: torch.save(state, p),
      "open_clip_ddp.pt": lambda p: torch.save(
          {"epoch": 3, "name": "run",
           "state_dict": {f"module.{k}": v for k, v in state.items()}}, p),
      "open_clip.bin": lambda p: torch.save(state, p, _use_new_zipfile_serialization=False),
      "open_clip.safetensors": lambda p: save_torch_safetensors(state, p),
  }
  for name, write in files.items():
    path = str(tmp_path / name)
    write(path)
    params = convert.load_pretrained(path, cfg)
    assert_trees_equal(params, expected)
  assert convert.detect_format(str(tmp_path / "ViT-tiny.pt")) == "openai"
  assert convert.detect_format(str(tmp_path / "open_clip.safetensors")) == "open_clip"
  images, tokens = random_inputs(cfg)
  assert_all_close(jax_outputs(params, cfg, images, tokens), hf_outputs(model, images, tokens))
  # What the tensors cannot say (heads, activation, eps) follows OpenAI's conventions.
  inferred = convert.model_config_from_source(str(tmp_path / "ViT-tiny.pt"))
  assert (inferred.image.width, inferred.image.depth, inferred.image.patch_size,
          inferred.image.image_size, inferred.text.context_length, inferred.embed_dim) == \
      (48, 2, 8, 32, 12, 24)
  assert inferred.image.num_heads == 1  # 48 // 64 rounded up to one head


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_reader_keeps_half_and_bfloat16_values(tmp_path):
  state = {"a.weight": torch.randn(4, 3).half(), "b.c": torch.randn(5).bfloat16(),
           "d": torch.arange(6, dtype=torch.float32).reshape(2, 3).T}  # non-contiguous strides
  path = str(tmp_path / "m.pt")
  _save_torchscript({**state, "transformer.resblocks.0.x": torch.zeros(1)}, path, 7)
  source = tensor_files.read_tensor_file(path)
  assert source.metadata == {"input_resolution": 7}
  for name, value in state.items():
    np.testing.assert_array_equal(source.get(name), value.float().numpy())


def _random_params(cfg, seed=3):
  """Every leaf of the model's parameter tree random, so a swap or transpose cannot go unnoticed."""
  model = clip.CLIPTeX(cfg)
  size, length = cfg.image.image_size, cfg.text.context_length
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32),
      np.zeros((1, length), np.int32)))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)


@pytest.mark.parametrize("scan", [False, True])
def test_jax_torch_jax_round_trip_is_bit_exact(scan, tmp_path):
  cfg = our_config("gelu", scan_layers=scan)
  params = _random_params(cfg)
  for naming in layout.NAMINGS:
    arrays = layout.to_torch_arrays(params, cfg, naming)
    source = tensor_files.array_source(arrays, f"<{naming}>")
    found = {"image.image_size": (cfg.image.image_size, "test"),
             "text.context_length": (cfg.text.context_length, "test")}
    assert_trees_equal(layout.from_torch(source, cfg, naming, naming, found), params)
  # Through files: the streamed HF export of leaves sharded over 8 devices, and open_clip.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  spec = lambda x: ("data",) if x.ndim and x.shape[0] % len(jax.devices()) == 0 else ()
  shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*spec(x))))
  sharded = jax.tree.map(shard, params)
  folder = str(tmp_path / "hf")
  hf.export(sharded, cfg, folder, image_mean=(0.5,) * 3, image_std=(0.2,) * 3,
            host=convert.host_array)
  assert_trees_equal(convert.load_pretrained(folder, cfg), params)
  with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:
    assert f.metadata() == {"format": "pt"}
  open_clip_path = str(tmp_path / "open_clip.safetensors")
  convert.open_clip.export(params, cfg, open_clip_path)
  assert_trees_equal(convert.load_pretrained(open_clip_path, cfg), params)


def test_tampered_state_dict_names_every_problem(quick_gelu_folder, tmp_path):
  cfg = our_config("quick_gelu")
  model = transformers.CLIPModel.from_pretrained(quick_gelu_folder)
  state = _openai_state_dict(model.state_dict())
  del state["visual.ln_pre.bias"]
  state["visual.extra.weight"] = torch.zeros(3)
  state["transformer.resblocks.1.attn.out_proj.weight"] = torch.zeros(40, 41)
  path = str(tmp_path / "tampered.pt")
  torch.save(state, path)
  with pytest.raises(convert.ConversionError) as error:
    convert.load_pretrained(path, cfg)
  message = str(error.value)
  for expected in ("missing keys (1): ['visual.ln_pre.bias']",
                   "unexpected keys (1): ['visual.extra.weight']",
                   "transformer.resblocks.1.attn.out_proj.weight: expected (40, 40), "
                   "found (40, 41)", path):
    assert expected in message, message

  # An HF folder with a tampered tensor, and a run config differing in several fields.
  hf_state = {k: v.contiguous() for k, v in model.state_dict().items()}
  hf_state["vision_model.encoder.layers.0.mlp.fc1.bias"] = torch.zeros(7)
  del hf_state["text_projection.weight"]
  folder = tmp_path / "hf"
  model.config.save_pretrained(folder)
  save_torch_safetensors(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(convert.ConversionError) as error:
    convert.load_pretrained(str(folder), cfg)
  message = str(error.value)
  assert "vision_model.encoder.layers.0.mlp.fc1.bias: expected (80,), found (7,)" in message
  assert "missing keys (1): ['text_projection.weight']" in str(error.value)
  with pytest.raises(convert.ConversionError, match="pass the folder with its config.json"):
    convert.load_pretrained(str(folder / "model.safetensors"), cfg)
  wrong = our_config("quick_gelu", **{"text.width": 64, "image.depth": 3,
                                      "image.activation": "gelu", "text.context_length": 20,
                                      "text.eos_token_id": 98})
  with pytest.raises(convert.ConversionError) as error:
    convert.load_pretrained(quick_gelu_folder, wrong)
  message = str(error.value)
  for field in ("text.width: expected 64", "image.depth: expected 3",
                "image.activation: expected 'gelu'", "text.context_length: expected 20",
                "text.eos_token_id: expected 98"):
    assert field in message, message


def test_pos_embedding_resize_matches_torch_interpolate():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(1 + 4 * 4, 5)).astype(np.float32)
  assert pos_embed.resize_image_pos_embedding(pos, 4) is pos
  for grid, method in ((6, "bicubic"), (7, "bilinear"), (3, "bicubic"), (6, "bilinear")):
    resized = pos_embed.resize_image_pos_embedding(pos, grid, method)
    assert resized.shape == (1 + grid * grid, 5)
    np.testing.assert_array_equal(resized[0], pos[0])
    grid_in = torch.from_numpy(pos[1:].reshape(1, 4, 4, 5)).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid_in, size=(grid, grid), mode=method,
                                               align_corners=False)
    np.testing.assert_allclose(resized[1:], expected.permute(0, 2, 3, 1).reshape(-1, 5).numpy(),
                               rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="only be shorter"):
    pos_embed.truncate_text_pos_embedding(pos, 40)


def test_resized_import_matches_hf_interpolate_pos_encoding(quick_gelu_folder):
  """224 -> 336 in miniature (32 -> 48 px), and a shorter text context (12 -> 8)."""
  model = transformers.CLIPModel.from_pretrained(quick_gelu_folder).eval()
  cfg = our_config("quick_gelu", **{"image.image_size": 48, "text.context_length": 8})
  params = convert.load_pretrained(quick_gelu_folder, cfg)
  assert params["img"]["pos_embedding"].shape == (1 + 6 * 6, 48)
  images, tokens = random_inputs(cfg)
  ours = jax_outputs(params, cfg, images, tokens)
  theirs = hf_outputs(model, images, tokens, interpolate_pos_encoding=True)
  assert_all_close(ours, theirs)


def test_safetensors_writer_takes_slots_in_any_order(tmp_path):
  path = str(tmp_path / "w.safetensors")
  a, b = np.arange(12, dtype=np.float32).reshape(6, 2), np.float32(3.5)
  with tensor_files.SafetensorsWriter(path, {"a": (6, 2), "b": ()}, {"format": "pt"}) as writer:
    writer.write("b", np.asarray(b))
    for slot in (2, 0, 1):
      writer.write("a", a[2 * slot:2 * slot + 2], slot, 3)
  with safe_open(path, "np") as f:
    np.testing.assert_array_equal(f.get_tensor("a"), a)
    assert f.get_tensor("b").shape == () and f.get_tensor("b") == b
  with pytest.raises(tensor_files.TensorFileError, match=r"never \(fully\) written: \['a'\]"):
    with tensor_files.SafetensorsWriter(str(tmp_path / "x.safetensors"), {"a": (6, 2)}) as writer:
      writer.write("a", a[:2], 0, 3)
  assert not os.path.exists(tmp_path / "x.safetensors")


# openai/clip-vit-* shapes (their config.json): vision (width, mlp, depth, heads, patch, size),
# text (width, mlp, depth, heads), projection.
PUBLISHED = {
    "B/32": ((768, 3072, 12, 12, 32, 224), (512, 2048, 12, 8), 512),
    "B/16": ((768, 3072, 12, 12, 16, 224), (512, 2048, 12, 8), 512),
    "L/14": ((1024, 4096, 24, 16, 14, 224), (768, 3072, 12, 12), 768),
    "L/14@336": ((1024, 4096, 24, 16, 14, 336), (768, 3072, 12, 12), 768),
}


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_variant_shapes_match_published_clip_and_our_model(variant):
  (width, mlp, depth, heads, patch, size), (t_width, t_mlp, t_depth, t_heads), proj = \
      PUBLISHED[variant]
  config = transformers.CLIPConfig(
      vision_config=dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                         num_attention_heads=heads, patch_size=patch, image_size=size),
      text_config=dict(hidden_size=t_width, intermediate_size=t_mlp, num_hidden_layers=t_depth,
                       num_attention_heads=t_heads), projection_dim=proj)
  with torch.device("meta"):
    hf_shapes = {k: tuple(v.shape) for k, v in transformers.CLIPModel(config).state_dict().items()}
  cfg = variants.model_config(variant)
  assert layout.torch_shapes(layout.plan(cfg, "hf")) == hf_shapes
  # layout's analytic shapes are the model's own, scanned and not.
  for scan in (False, True):
    cfg.scan_layers = scan
    model = clip.CLIPTeX(cfg)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(
        jax.random.PRNGKey(0), np.zeros((1, cfg.image.image_size, cfg.image.image_size, 3)),
        np.zeros((1, 77), np.int32)))["params"])
    flat = {k: tuple(v.shape) for k, v in layout.flatten(shapes).items()}
    expected = layout.tower_shapes(cfg)
    if scan:  # block_{i}/x -> blocks/x with a leading layer axis
      depths = {"img": cfg.image.depth, "txt": cfg.text.depth}
      expected = {re.sub(r"block_\d+/", "blocks/", k):
                  (depths[k[:3]],) + s if "/block_" in k else s for k, s in expected.items()}
    assert flat == expected


@pytest.mark.parametrize("open_clip_file", ["open_clip.safetensors", "open_clip.pt"])
def test_a_siglip_trained_models_logit_bias_survives_export_and_import(open_clip_file, tmp_path):
  """CLIPModel has no logit_bias: the export keeps it in config.json (transformers reads it back
  as config.logit_bias) and in the open_clip state dict and config; importing either gives a
  config with that bias and the bias itself, while a model without one (softmax CLIP) takes the
  same files' towers and leaves the bias out."""
  cfg = our_config("gelu", logit_bias_init=-10.0)
  params = _random_params(cfg)
  params["logit_bias"] = np.float32(-7.25)  # trained away from its init
  folder, open_clip_path = str(tmp_path / "hf"), str(tmp_path / open_clip_file)
  convert.export_pretrained(params, cfg, folder, image_mean=(0.5,) * 3, image_std=(0.2,) * 3,
                            open_clip_path=open_clip_path)
  assert transformers.CLIPConfig.from_pretrained(folder).logit_bias == -7.25
  with open(os.path.join(str(tmp_path), "open_clip_config.json")) as f:
    assert json.load(f)["model_cfg"]["init_logit_bias"] == -7.25
  for source in (folder, open_clip_path):
    found_cfg = convert.model_config_from_source(source)
    assert found_cfg.logit_bias_init == -7.25, source
    loaded = convert.load_pretrained(source, cfg)
    assert float(loaded["logit_bias"]) == -7.25, source
    assert_trees_equal({k: v for k, v in loaded.items() if k != "logit_bias"},
                       {k: v for k, v in params.items() if k != "logit_bias"})
    softmax_cfg = our_config("gelu")
    assert "logit_bias" not in convert.load_pretrained(source, softmax_cfg), source
  model = transformers.CLIPModel.from_pretrained(folder)  # no unexpected or missing weights
  assert float(model.logit_scale.detach()) == pytest.approx(float(params["logit_scale"]))
