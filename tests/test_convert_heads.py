"""Export to PyTorch with task heads: the torch reference heads against the JAX heads, a full
export loaded by transformers (CLIPModel, CLIPProcessor, CLIPVisionModel + torch_heads) and
compared, the files read back bit-exactly, and tools/convert.py on a real checkpoint."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from clipzoo_jax import checkpoint
from clipzoo_jax import convert
from clipzoo_jax import tasks as task_lib
from clipzoo_jax.convert import layout, parity, torch_heads
from clipzoo_jax.data import tokenizer as tokenizer_lib
from clipzoo_jax.models import clip, heads as heads_lib, variants

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
TASKS = ("seg", "depth", "normals", "det")
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.26, 0.27)


def random_tree(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), shapes)


def relative_error(found, expected):
  return float(np.max(np.abs(found - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("upsample,final_upsample",
                         [(2, "auto"), (4, "auto"), (2, "bilinear"), (4, "conv"), (4, None)])
def test_torch_heads_match_jax_heads(upsample, final_upsample):
  """Every placement of the heads' last conv ("auto": seg and the det heatmap at the label size,
  the others a stage earlier); None: a config and an export from before the option existed
  (no key), which both sides read as "conv"."""
  model_config = variants.model_config("mu/4", image_size=12, tasks=TASKS, num_seg_classes=5,
                                       num_det_classes=3)
  model_config.image.width, model_config.heads.hidden = 16, 8
  model_config.heads.upsample = upsample
  if final_upsample is None:
    del model_config.heads["final_upsample"]
  else:
    model_config.heads.final_upsample = final_upsample
  config = convert.heads_config(model_config)
  modes = {head["name"]: head["final_upsample"] for head in config["heads"]}
  if final_upsample == "auto":
    assert modes == {"seg_head": "conv", "depth_head": "bilinear", "normals_head": "bilinear",
                     "det_heatmap_head": "conv", "det_box_head": "bilinear"}
  else:
    assert set(modes.values()) == {final_upsample or "conv"}
  if final_upsample is None:
    for head in config["heads"]:
      del head["final_upsample"]  # as in a folder exported before the option
  module = clip.task_heads(model_config)
  grid = np.random.default_rng(0).normal(size=(2, 3, 3, 16)).astype(np.float32)
  shapes = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), grid))["params"])
  params = random_tree(shapes, seed=upsample)
  ours = jax.jit(module.apply)({"params": params}, grid)

  state = torch_heads.heads_to_torch(params)
  heads = torch_heads.TaskHeads(config)
  heads.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  with torch.no_grad():
    theirs = heads(torch.from_numpy(grid.reshape(2, 9, 16)))  # patch tokens, as from HF
  assert sorted(theirs) == sorted(ours)
  for name in ours:
    assert theirs[name].shape == ours[name].shape, name
    assert relative_error(theirs[name].numpy(), np.asarray(ours[name])) <= TOLERANCE, name
  restored = torch_heads.heads_from_torch(state)
  for path, value in layout.flatten(params).items():
    assert np.array_equal(layout.flatten(restored)[path], value), path


def tiny_config(vocab_size, tasks=TASKS):
  cfg = variants.model_config("mu/8", image_size=32, tasks=tasks, num_seg_classes=5,
                              num_det_classes=3, vocab_size=vocab_size, context_length=8)
  cfg.image.width, cfg.image.num_heads, cfg.image.mlp_dim = 32, 4, 48
  cfg.text.width, cfg.text.depth = 24, 1
  cfg.embed_dim = 16
  cfg.heads.hidden = 8
  return cfg


def random_params(cfg, seed=0):
  model = clip.CLIPTeX(cfg)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32),
      np.zeros((1, cfg.text.context_length), np.int32)))["params"])
  params = random_tree(shapes, seed)
  params["logit_scale"] = np.asarray(2.0, np.float32)
  return params


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A real CLIP-layout BPE tokenizer (byte symbols + sot/eot, no merges)."""
  directory = str(tmp_path_factory.mktemp("tokenizer"))
  tokens = tokenizer_lib.base_vocabulary() + [tokenizer_lib.SOT, tokenizer_lib.EOT]
  tokenizer_lib.Tokenizer({t: i for i, t in enumerate(tokens)}, [], 8).save_pretrained(directory)
  return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
  vocab = tokenizer_lib.Tokenizer.from_pretrained(tokenizer_dir).vocab_size
  cfg = tiny_config(vocab)
  params = random_params(cfg)
  out = str(tmp_path_factory.mktemp("export"))
  open_clip_path = os.path.join(out, "open_clip", "model.pt")
  convert.export_pretrained(params, cfg, out, MEAN, STD, tokenizer_dir=tokenizer_dir,
                            open_clip_path=open_clip_path)
  return cfg, params, out, open_clip_path


@pytest.mark.slow
def test_export_loads_in_transformers_and_matches_jax(exported, tokenizer_dir):
  cfg, params, out, _ = exported
  for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
               "vocab.json", "merges.txt", "heads.safetensors", "heads_config.json",
               "torch_heads.py"):
    assert os.path.isfile(os.path.join(out, name)), name
  processor = transformers.CLIPProcessor.from_pretrained(out)
  crop = processor.image_processor.crop_size
  assert (crop["height"], crop["width"]) == (32, 32)
  np.testing.assert_allclose(processor.image_processor.image_mean, MEAN)
  np.testing.assert_allclose(processor.image_processor.image_std, STD)
  ours = tokenizer_lib.Tokenizer.from_pretrained(tokenizer_dir, 8).encode(["a cat"])[0]
  theirs = processor(text=["a cat"], padding="max_length", max_length=8).input_ids[0]
  length = int(np.argmax(ours == len(tokenizer_lib.base_vocabulary()) + 1)) + 1
  assert list(theirs[:length]) == list(ours[:length])  # same ids up to eot (pads differ)
  pixels = processor(images=np.zeros((40, 50, 3), np.uint8), return_tensors="pt").pixel_values
  assert tuple(pixels.shape) == (1, 3, 32, 32)

  # Independent of parity.py: transformers + torch_heads called directly, same inputs.
  images, tokens = parity.random_inputs(cfg, batch=3, seed=5)
  model = transformers.CLIPModel.from_pretrained(out).eval()
  vision = transformers.CLIPVisionModel.from_pretrained(out).eval()
  heads = torch_heads.TaskHeads.from_pretrained(out)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    result = model(input_ids=torch.from_numpy(tokens.astype(np.int64)), pixel_values=pixels)
    head_out = heads(vision(pixel_values=pixels).last_hidden_state[:, 1:])
  jax_out = jax.jit(clip.CLIPTeX(cfg).apply)({"params": params}, images, tokens)
  normed = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = (np.exp(2.0) * normed(np.asarray(jax_out["image_embedding"]))
            @ normed(np.asarray(jax_out["text_embedding"])).T)
  assert relative_error(result.logits_per_image.numpy(), logits) <= TOLERANCE
  assert relative_error(result.image_embeds.numpy(),
                        normed(np.asarray(jax_out["image_embedding"]))) <= TOLERANCE
  assert relative_error(result.text_embeds.numpy(),
                        normed(np.asarray(jax_out["text_embedding"]))) <= TOLERANCE
  for name, value in jax_out["heads"].items():
    assert relative_error(head_out[name].numpy(), np.asarray(value)) <= TOLERANCE, name
  errors = parity.compare(params, cfg, out, batch=2)
  assert set(errors) >= {"image_embedding", "text_embedding", "logits_per_image", "heads/seg"}
  assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.slow
def test_export_reads_back_bit_exact(exported):
  cfg, params, out, open_clip_path = exported
  towers = {k: params[k] for k in ("img", "txt", "logit_scale")}
  for source in (out, open_clip_path):
    loaded = convert.load_pretrained(source, cfg)
    flat, expected = layout.flatten(loaded), layout.flatten(towers)
    assert sorted(flat) == sorted(expected)
    assert all(np.array_equal(flat[k], expected[k]) for k in flat), source
  state, config = torch_heads.load_heads(out)
  assert config == convert.heads_config(cfg)
  restored = layout.flatten(torch_heads.heads_from_torch(state))
  expected = layout.flatten(params["heads"])
  assert sorted(restored) == sorted(expected)
  assert all(np.array_equal(restored[k], expected[k]) for k in restored)


@pytest.mark.slow
def test_exported_torch_heads_module_runs_without_jax(exported):
  _, _, out, _ = exported
  code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import torch_heads; "
          "h = torch_heads.TaskHeads.from_pretrained(sys.argv[1]); "
          "out = h(torch.zeros(2, 16, 32)); "
          "assert 'jax' not in sys.modules and 'clipzoo_jax' not in sys.modules; "
          "print(sorted((k, tuple(v.shape)) for k, v in out.items()))")
  result = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True,
                          check=True, cwd="/")
  assert "('seg', (2, 16, 16, 5))" in result.stdout and "('depth', (2, 16, 16))" in result.stdout


def _load_tool():
  spec = importlib.util.spec_from_file_location("convert_tool", os.path.join(ROOT, "tools",
                                                                             "convert.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  return tool


@pytest.mark.slow
def test_convert_tool_export_check_import(tmp_path, tokenizer_dir):
  """A workdir as the trainer leaves it (config.json, tokenizer, Orbax checkpoint, scanned
  layers): export, parity check, and import of the export."""
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(tokenizer_dir, os.path.join(workdir, "tokenizer"))
  vocab = tokenizer_lib.Tokenizer.from_pretrained(tokenizer_dir).vocab_size
  config = variants.ml_collections.ConfigDict()
  config.model = tiny_config(vocab, tasks=("seg", "det"))
  config.model.scan_layers = True
  config.model.dtype = "bfloat16"  # the exporter and the check run float32
  config.tokenizer = {"directory": "tokenizer", "context_length": 8}
  checkpoint.save_config(workdir, config)
  params = random_params(config.model, seed=1)
  saver = checkpoint.Checkpointer(workdir, async_save=False)
  for step in (3, 7):
    saver.save(step, {"step": np.int32(step), "params": params,
                      "opt_state": {"count": np.int32(step)}}, {"epoch": 0})
  saver.close()

  tool = _load_tool()
  out = str(tmp_path / "hf")
  report = tool.main(["export", "--workdir", workdir, "--out", out, "--step", "7",
                      "--open_clip", str(tmp_path / "oc.safetensors")])
  assert "heads.safetensors" in report["files"] and os.path.isfile(tmp_path / "oc.safetensors")
  with open(os.path.join(out, "config.json")) as f:
    hf_config = json.load(f)
  assert hf_config["text_config"]["eos_token_id"] == 2  # argmax pooling, as ours (None)
  report = tool.main(["check", "--workdir", workdir, "--hf", out])
  assert report["ok"] and report["max"] <= TOLERANCE, report
  assert {"heads/seg", "heads/det_heatmap", "heads/det_size"} <= set(report["relative_errors"])
  npz = str(tmp_path / "params.npz")
  report = tool.main(["import", "--source", out, "--out", npz, "--workdir", workdir])
  loaded = np.load(npz)
  expected = layout.flatten({k: params[k] for k in ("img", "txt", "logit_scale")})
  assert sorted(loaded.files) == sorted(expected)
  assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
  assert report["num_params"] == sum(v.size for v in expected.values())
