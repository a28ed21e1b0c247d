"""Conversion inputs a new user gets wrong: an end-of-text id outside the vocabulary, corrupt weight
files of every format, an activation our towers lack; and what an export hands over: one file mode
for every file, an open_clip config whose pooling a reference forward (open_clip's architecture,
written here) reproduces against our JAX model."""

import collections
import json
import os
import stat

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from safetensors.torch import save_file

from clipzoo_jax import convert
from clipzoo_jax.convert import parity
from clipzoo_jax.data import tokenizer as tokenizer_lib
from clipzoo_jax.models import clip, variants

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TOLERANCE = 1e-4


def tiny_hf(folder, vocab_size=1024, **text):
  """A random CLIPModel whose text config keeps transformers' defaults unless given."""
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8, vocab_size=vocab_size,
                       **text),
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8), projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(folder)
  return model


def byte_tokenizer(folder):
  """A CLIP-layout tokenizer: 512 byte symbols (with and without </w>), sot, then eot (its largest
  id, returned)."""
  tokens = tokenizer_lib.base_vocabulary() + [tokenizer_lib.SOT, tokenizer_lib.EOT]
  tokenizer_lib.Tokenizer({t: i for i, t in enumerate(tokens)}, [], 8).save_pretrained(folder)
  return len(tokens) - 1


def test_eos_outside_vocabulary_is_refused_and_the_suggestion_works(tmp_path):
  folder = str(tmp_path / "hf")
  tiny_hf(folder)  # transformers' default eos_token_id 49407, vocabulary 1024
  with pytest.raises(convert.ConversionError) as error:
    convert.model_config_from_source(folder)
  message = str(error.value)
  assert "text_config.eos_token_id: 49407 is outside the vocabulary (vocab_size 1024)" in message
  assert "config.json" in message and "found value" not in message
  # With the folder's tokenizer, the suggestion is its end-of-text id; following it works.
  eot = byte_tokenizer(folder)
  with pytest.raises(convert.ConversionError, match=f"set .*eos_token_id to {eot}, the"):
    convert.model_config_from_source(folder)
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  config["text_config"]["eos_token_id"] = eot
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  model_config = convert.model_config_from_source(folder)
  assert model_config.text.eos_token_id == eot
  params = convert.load_pretrained(folder, model_config)
  images, tokens = parity.random_inputs(model_config, batch=3, seed=2)
  text = parity.jax_outputs(params, model_config, images, tokens)["text_embedding"]
  assert np.min(np.abs(text[0] - text[1])) > 0  # pooled at the eot, not position 0 for all
  # The run config is checked too: the old hint's value, and an id that is not the tokenizer's.
  model_config.text.eos_token_id = 49407
  with pytest.raises(convert.ConversionError, match="model.text.eos_token_id: 49407 is outside"):
    convert.load_pretrained(folder, model_config)
  model_config.text.eos_token_id = 100
  with pytest.raises(convert.ConversionError, match=f"ends text with .* = {eot}"):
    convert.load_pretrained(folder, model_config, tokenizer_dir=folder)


def test_export_refuses_eos_that_cannot_work(tmp_path):
  cfg = variants.model_config("mu/8", image_size=16, vocab_size=600, context_length=8)
  eot = byte_tokenizer(str(tmp_path / "tok"))
  for eos, tokenizer, expected in ((600, None, "600 is outside the vocabulary"),
                                   (5, str(tmp_path / "tok"), f"ends text with .* = {eot}")):
    cfg.text.eos_token_id = eos
    with pytest.raises(convert.ConversionError, match=expected):
      convert.export_pretrained({"img": {}, "txt": {}, "logit_scale": np.float32(1)}, cfg,
                                str(tmp_path / "out"), (0.5,) * 3, (0.5,) * 3, tokenizer)
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def _corruptions(good_safetensors, good_pt):
  raw, raw_pt = open(good_safetensors, "rb").read(), open(good_pt, "rb").read()
  noise = np.random.default_rng(0).bytes(2000)
  return {
      "truncated.safetensors": raw[:len(raw) // 2], "header_only.safetensors": raw[:12],
      "empty.pt": b"", "empty.safetensors": b"", "random.pt": noise, "random.safetensors": noise,
      "random.bin": b"\x80\x02" + noise, "text.pt": b"hello world", "truncated.pt": raw_pt[:300],
      "bad.safetensors.index.json": b"{not json", "list.safetensors.index.json": b"[1, 2]",
      "binary.safetensors.index.json": b"\xff\xfe\x00",
      "missing.safetensors.index.json": b'{"weight_map": {"a": "absent.safetensors"}}',
  }


def test_corrupt_weight_files_raise_one_error_naming_the_file(tmp_path):
  state = {"visual.conv1.weight": torch.randn(8, 3, 4, 4), "token_embedding.weight": torch.ones(5)}
  save_file(state, str(tmp_path / "good.safetensors"))
  torch.save(state, str(tmp_path / "good.pt"))
  cfg = variants.model_config("mu/8", image_size=16)
  cases = _corruptions(tmp_path / "good.safetensors", tmp_path / "good.pt")
  for name, content in cases.items():
    path = str(tmp_path / name)
    with open(path, "wb") as f:
      f.write(content)
    for call in (lambda: convert.load_pretrained(path, cfg),
                 lambda: convert.model_config_from_source(path)):
      with pytest.raises(convert.ConversionError) as error:
        call()
      assert path in str(error.value) or "absent.safetensors" in str(error.value), name
  # HF folders: a broken config.json (several ways) and broken weights beside a good one.
  tiny_hf(str(tmp_path / "hf"), eos_token_id=2)
  good_config = open(tmp_path / "hf" / "config.json", "rb").read()
  broken = {"config.json": [b"{oops", b"[1]", b"\xff\xfe", b'{"model_type": "clip", '
                            b'"text_config": {"num_attention_heads": 0}}'],
            "model.safetensors": [b"", cases["truncated.safetensors"], noise_of(64)]}
  for file_name, contents in broken.items():
    for content in contents:
      folder = tmp_path / f"hf_{file_name}_{len(content)}"
      folder.mkdir()
      (folder / "config.json").write_bytes(good_config)
      (folder / "model.safetensors").write_bytes(open(tmp_path / "hf" / "model.safetensors",
                                                      "rb").read())
      (folder / file_name).write_bytes(content)
      with pytest.raises(convert.ConversionError, match=str(folder / file_name)):
        convert.load_pretrained(str(folder), convert.model_config_from_source(
            str(tmp_path / "hf")))


def noise_of(size):
  return np.random.default_rng(size).bytes(size)


@pytest.mark.parametrize("section", ["vision_config", "text_config"])
def test_unsupported_activation_is_refused_at_import(tmp_path, section):
  tiny_hf(str(tmp_path), eos_token_id=2)
  config = json.loads((tmp_path / "config.json").read_text())
  config[section]["hidden_act"] = "relu"
  (tmp_path / "config.json").write_text(json.dumps(config))
  for call in (lambda: convert.model_config_from_source(str(tmp_path)),
               lambda: convert.load_pretrained(str(tmp_path), variants.model_config("mu/8"))):
    with pytest.raises(convert.ConversionError, match=f"{section}.hidden_act: expected one of "
                       r"\[.*\].*found 'relu'"):
      call()
  # The run config's own activation is checked at import, not when the model is built.
  cfg = variants.model_config("mu/8")
  cfg.text.activation = "relu"
  state_dict = str(tmp_path / "open_clip.safetensors")
  save_file({"token_embedding.weight": torch.zeros(cfg.text.vocab_size, 64)}, state_dict)
  with pytest.raises(convert.ConversionError, match="model.text.activation: expected one of"):
    convert.load_pretrained(state_dict, cfg)


def _mid_vocab_config(**changes):
  """Towers with pooling at eos 150 mid-vocabulary, unequal MLP ratios, exact gelu, eps 1e-6."""
  cfg = variants.model_config("mu/8", image_size=16, tasks=("seg",), num_seg_classes=3,
                              vocab_size=300, context_length=8)
  cfg.image.width, cfg.image.num_heads, cfg.image.mlp_dim = 48, 3, 80
  cfg.text.width, cfg.text.num_heads, cfg.text.mlp_dim, cfg.text.depth = 32, 2, 72, 1
  cfg.embed_dim, cfg.heads.hidden, cfg.text.eos_token_id = 24, 8, 150
  for tower in (cfg.image, cfg.text):
    tower.activation, tower.layer_norm_eps = "gelu", 1e-6
  for key, value in changes.items():
    section, _, field = key.rpartition(".")
    cfg[section][field] = value
  return cfg


def _random_params(cfg):
  model = clip.CLIPTeX(cfg)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32),
      np.zeros((1, cfg.text.context_length), np.int32)))["params"])
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), shapes)


class _Block(torch.nn.Module):
  """open_clip's ResidualAttentionBlock (pre-LN, nn.MultiheadAttention, c_fc/act/c_proj)."""

  def __init__(self, width, heads, mlp_ratio, act, eps):
    super().__init__()
    self.ln_1, self.ln_2 = torch.nn.LayerNorm(width, eps=eps), torch.nn.LayerNorm(width, eps=eps)
    self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    hidden = int(width * mlp_ratio)  # as open_clip computes the MLP width
    self.mlp = torch.nn.Sequential(collections.OrderedDict(
        c_fc=torch.nn.Linear(width, hidden), gelu=act, c_proj=torch.nn.Linear(hidden, width)))

  def forward(self, x, mask=None):
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
    return x + self.mlp(self.ln_2(x))


class _QuickGELU(torch.nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


def _open_clip_reference(model_cfg):
  """open_clip's CLIP (ViT + text transformer) built from the written model config only."""
  def tower(cfg, heads):
    act = _QuickGELU() if model_cfg["quick_gelu"] else torch.nn.GELU(**cfg.get("act_kwargs", {}))
    module = torch.nn.Module()
    module.resblocks = torch.nn.ModuleList(
        _Block(cfg["width"], heads, cfg["mlp_ratio"], act, cfg["norm_kwargs"]["eps"])
        for _ in range(cfg["layers"]))
    return module
  v, t, embed = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]
  grid, eps_v, eps_t = v["image_size"] // v["patch_size"], v["norm_kwargs"]["eps"], \
      t["norm_kwargs"]["eps"]
  m, p = torch.nn.Module(), torch.nn.Parameter
  m.visual = torch.nn.Module()
  m.visual.conv1 = torch.nn.Conv2d(3, v["width"], v["patch_size"], v["patch_size"], bias=False)
  m.visual.class_embedding = p(torch.zeros(v["width"]))
  m.visual.positional_embedding = p(torch.zeros(grid * grid + 1, v["width"]))
  m.visual.ln_pre = torch.nn.LayerNorm(v["width"], eps=eps_v)
  m.visual.transformer = tower(v, v["width"] // v["head_width"])
  m.visual.ln_post = torch.nn.LayerNorm(v["width"], eps=eps_v)
  m.visual.proj = p(torch.zeros(v["width"], embed))
  m.token_embedding = torch.nn.Embedding(t["vocab_size"], t["width"])
  m.positional_embedding = p(torch.zeros(t["context_length"], t["width"]))
  m.transformer = tower(t, t["heads"])
  m.ln_final = torch.nn.LayerNorm(t["width"], eps=eps_t)
  m.text_projection = p(torch.zeros(t["width"], embed))
  m.logit_scale = p(torch.zeros(()))
  return m


def _reference_forward(m, text_cfg, images, tokens):
  x = m.visual.conv1(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).flatten(2)
  x = torch.cat([m.visual.class_embedding.expand(len(x), 1, -1), x.transpose(1, 2)], 1)
  x = m.visual.ln_pre(x + m.visual.positional_embedding)
  for block in m.visual.transformer.resblocks:
    x = block(x)
  image = m.visual.ln_post(x)[:, 0] @ m.visual.proj
  ids = torch.from_numpy(tokens.astype(np.int64))
  length = ids.shape[1]
  mask = torch.full((length, length), float("-inf")).triu(1)
  x = m.token_embedding(ids) + m.positional_embedding
  for block in m.transformer.resblocks:
    x = block(x, mask)
  x = m.ln_final(x)
  pooled = ids.argmax(-1) if text_cfg["pool_type"] == "argmax" else \
      (ids == text_cfg["eos_id"]).int().argmax(-1)  # open_clip's text_global_pool
  return image.numpy(), (x[torch.arange(len(x)), pooled] @ m.text_projection).numpy()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_export_writes_the_config_open_clip_needs(tmp_path, suffix):
  cfg = _mid_vocab_config()
  params = _random_params(cfg)
  path = str(tmp_path / "oc" / f"model{suffix}")
  convert.export_pretrained(params, cfg, str(tmp_path / "hf"), (0.4,) * 3, (0.3,) * 3,
                            open_clip_path=path)
  with open(tmp_path / "oc" / "open_clip_config.json") as f:
    written = json.load(f)
  text_cfg = written["model_cfg"]["text_cfg"]
  assert (text_cfg["pool_type"], text_cfg["eos_id"]) == ("eos", 150)
  assert written["preprocess_cfg"]["mean"] == [0.4] * 3
  reference = _open_clip_reference(written["model_cfg"])
  state = convert.tensor_files.read_tensor_file(path)
  reference.load_state_dict({n: torch.from_numpy(state.get(n)) for n in state.names()},
                            strict=True)  # every name and shape open_clip's CLIP has
  images, tokens = parity.random_inputs(cfg, batch=3, seed=4)
  ours = parity.jax_outputs(params, cfg, images, tokens)
  with torch.no_grad():
    image, text = _reference_forward(reference, text_cfg, images, tokens)
    _, argmax_text = _reference_forward(reference, {"pool_type": "argmax"}, images, tokens)
  assert parity.relative_error(image, ours["image_embedding"]) <= TOLERANCE
  assert parity.relative_error(text, ours["text_embedding"]) <= TOLERANCE
  assert parity.relative_error(argmax_text, ours["text_embedding"]) > 0.1  # pooling matters


def test_open_clip_export_refuses_what_it_cannot_express(tmp_path):
  cfg = _mid_vocab_config(**{"text.activation": "quick_gelu"})
  with pytest.raises(convert.ConversionError, match="one quick_gelu flag for both towers"):
    convert.export_pretrained({"img": {}, "txt": {}, "logit_scale": np.float32(1)}, cfg,
                              str(tmp_path / "hf"), (0.5,) * 3, (0.5,) * 3,
                              open_clip_path=str(tmp_path / "oc.pt"))
  assert not os.path.exists(tmp_path / "hf")  # refused before anything was written


def test_every_exported_file_has_the_same_mode(tmp_path):
  cfg = _mid_vocab_config(**{"text.vocab_size": 1024})
  cfg.text.eos_token_id = byte_tokenizer(str(tmp_path / "tok"))
  out = str(tmp_path / "out")
  convert.export_pretrained(_random_params(cfg), cfg, out, (0.5,) * 3, (0.5,) * 3,
                            tokenizer_dir=str(tmp_path / "tok"),
                            open_clip_path=os.path.join(out, "open_clip", "model.safetensors"))
  umask = os.umask(0)
  os.umask(umask)
  files = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names]
  modes = {os.path.relpath(f, out): stat.S_IMODE(os.stat(f).st_mode) for f in files}
  assert {"heads.safetensors", "model.safetensors", "open_clip/open_clip_config.json"} <= set(modes)
  assert set(modes.values()) == {0o666 & ~umask}, modes
