"""Evaluation as a user runs it: the evaluators run in the training process at a step and
`tools/evaluate.py` on that step's checkpoint give the same numbers, merged into the step's one
row; a pre-trained Hugging Face CLIP (`--init`) is measured with its own towers; and the report
compares three runs in a table and a chart."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from clipzoo_jax import checkpoint, evals, metrics
from clipzoo_jax.data import toyworld
from clipzoo_jax.data import tokenizer as tokenizer_lib
from clipzoo_jax.evals import base, datasets, report, standalone
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


def _config():
  config = helpers.tiny_config(tasks=("seg", "depth"))
  config.model.text.vocab_size = 600
  config.model.text.eos_token_id = 599  # the trained tokenizer's end-of-text id (its last)
  config.tokenizer.directory = "tokenizer"
  config.mesh, config.mesh_allow_shrink = [4, 2, 1], False
  config.global_batch_size = 16
  toy = lambda kind, seed, n, **kw: dict(kind=kind, seed=seed, num_examples=n, size=SIZE, **kw)
  config.evals = ml_collections.ConfigDict(dict(
      zeroshot=dict(type="zeroshot", every=2, dataset=toy("classification", 11, 40)),
      retrieval=dict(type="retrieval", every=2, dataset=toy("retrieval", 12, 24)),
      seg_probe=dict(type="dense_probe", task="seg", every=2, steps=8, label_size=16,
                     train_dataset=toy("dense", 13, 64, split="probe_train"),
                     dataset=toy("dense", 14, 40)),
  ))
  return config


def _workdir(path):
  captions = [toyworld.render_scene(0, i, SIZE).caption for i in range(150)]
  tokenizer_lib.train_tokenizer(captions + list(datasets.TOYWORLD_CLASSES), 600,
                                str(path / "tokenizer"))
  return str(path)


def _env():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return env


@pytest.mark.slow
def test_standalone_on_a_checkpoint_equals_the_evaluation_during_training(tmp_path):
  workdir = _workdir(tmp_path)
  config = _config()
  run = helpers.run_on(config, config.mesh)
  checkpoint.save_config(workdir, config)
  evaluators = evals.build_evaluators(config, run, workdir)  # as the loop: once, after setup
  state = run.init_state()
  writer = metrics.MetricsWriter(workdir)
  writer.write(1, {"loss": 3.0})
  in_training = {}
  for evaluator in evaluators:  # what the loop does at a step where `every` is due
    in_training.update(evaluator.run(state["params"]))
  writer.write(1, in_training)
  writer.close()
  saver = checkpoint.Checkpointer(workdir, async_save=False)
  saver.save(1, state, {})
  saver.close()

  result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"),
                           f"--workdir={workdir}", "--step=1"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert "zeroshot/top1" in result.stdout and "seg_probe/miou" in result.stdout
  rows = helpers.metrics_file_rows(workdir)
  assert [row["step"] for row in rows] == [1]  # merged into step 1's row, not repeated
  assert rows[0]["loss"] == 3.0
  assert set(in_training) <= set(rows[0])
  for name, value in in_training.items():
    assert rows[0][name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def _hf_clip(config, path):
  import transformers  # pylint: disable=import-outside-toplevel
  mc = config.model
  hf_config = transformers.CLIPConfig(
      text_config=dict(hidden_size=mc.text.width, intermediate_size=mc.text.mlp_dim,
                       num_hidden_layers=mc.text.depth, num_attention_heads=mc.text.num_heads,
                       vocab_size=mc.text.vocab_size,
                       max_position_embeddings=mc.text.context_length, hidden_act="quick_gelu",
                       eos_token_id=599, bos_token_id=598, pad_token_id=0),
      vision_config=dict(hidden_size=mc.image.width, intermediate_size=mc.image.mlp_dim,
                         num_hidden_layers=mc.image.depth, num_attention_heads=mc.image.num_heads,
                         image_size=mc.image.image_size, patch_size=mc.image.patch_size,
                         hidden_act="quick_gelu"),
      projection_dim=mc.embed_dim)
  model = transformers.CLIPModel(hf_config)
  model.save_pretrained(path)
  return model.eval()


def _torch_unit(features):
  """Unit rows of `get_*_features` (transformers 5: the projection is the `pooler_output`)."""
  array = features.pooler_output.detach().numpy().astype(np.float64)
  return array / np.linalg.norm(array, axis=-1, keepdims=True)


@pytest.mark.slow
def test_init_measures_a_hugging_face_clip_with_its_own_towers(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  from clipzoo_jax.evals import prompts  # pylint: disable=import-outside-toplevel
  workdir = _workdir(tmp_path)
  config = _config()
  config.evals = ml_collections.ConfigDict({"zeroshot": config.evals.zeroshot})
  hf_model = _hf_clip(config, str(tmp_path / "hf_clip"))
  step, results = standalone.evaluate(config, workdir, init=str(tmp_path / "hf_clip"))
  assert step == 0
  assert metrics.read_rows(workdir)[0]["zeroshot/top1"] == results["zeroshot"]["zeroshot/top1"]

  # the same zero-shot from the PyTorch model's own features
  split = datasets.toyworld_classification(40, 11, SIZE)
  batch = next(split.batches(base.augment_options(config), 40))
  tokenizer = tokenizer_lib.Tokenizer.from_pretrained(f"{workdir}/tokenizer", 8)
  texts = prompts.prompts(datasets.TOYWORLD_CLASSES, prompts.TOYWORLD_TEMPLATES)
  with torch.no_grad():
    images = _torch_unit(hf_model.get_image_features(
        pixel_values=torch.from_numpy(np.array(batch["image"])).permute(0, 3, 1, 2)))
    text = _torch_unit(hf_model.get_text_features(
        input_ids=torch.from_numpy(np.asarray(tokenizer.encode(texts), np.int64))))
  classes = text.reshape(len(datasets.TOYWORLD_CLASSES), len(prompts.TOYWORLD_TEMPLATES), -1)
  classes = classes.mean(1)
  classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
  top1 = np.mean((images @ classes.T).argmax(1) == batch["label"])
  assert results["zeroshot"]["zeroshot/top1"] == pytest.approx(top1)


def _fake_run(workdir, rows, evals_config):
  config = ml_collections.ConfigDict(dict(evals=evals_config))
  checkpoint.save_config(str(workdir), config)
  writer = metrics.MetricsWriter(str(workdir), tensorboard=False)
  for step, values in rows:
    writer.write(step, values)
  writer.close()
  return str(workdir)


def test_report_compares_three_runs_with_relative_changes(tmp_path):
  evals_config = {"zs": {"type": "zeroshot"}, "seg": {"type": "dense_probe", "prefix": "probe"}}
  runs = [
      _fake_run(tmp_path / "clip", [(0, {"zs/top1": 0.5, "probe/miou": 0.2, "loss": 3.0})],
                evals_config),
      _fake_run(tmp_path / "clip_ft", [(100, {"zs/top1": 0.4, "loss": 2.0}),
                                       (200, {"zs/top1": 0.45, "probe/miou": 0.25})],
                evals_config),
      _fake_run(tmp_path / "cliptex", [(200, {"zs/top1": 0.5, "probe/miou": 0.3,
                                              "probe/abs_rel": 0.1})], evals_config),
  ]
  md_path, png_path = report.compare(runs, str(tmp_path / "report"))
  table = open(md_path).read()
  assert "| metric | clip | clip_ft | Δ vs clip | cliptex | Δ vs clip |" in table
  assert "| `zs/top1` | 0.5000 | 0.4500 | -10.0% | 0.5000 | +0.0% |" in table
  assert "| `probe/miou` | 0.2000 | 0.2500 | +25.0% | 0.3000 | +50.0% |" in table
  assert "| `probe/abs_rel` (↓) | — | — | — | 0.1000 | — |" in table
  assert "loss" not in table.replace("probe_train_loss", "")
  with open(png_path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_tool_and_evaluate_compare_write_the_same_report(tmp_path):
  runs = [_fake_run(tmp_path / name, [(10, {"zs/top1": value})], {"zs": {"type": "zeroshot"}})
          for name, value in (("a", 0.2), ("b", 0.3), ("c", 0.1))]
  outputs = []
  for tool, workdirs in (("report.py", ["--workdirs", *runs]),  # as the README: spaces
                         ("evaluate.py", [f"--compare={','.join(runs)}"])):
    out = str(tmp_path / tool)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *workdirs,
                             f"--out={out}"], env=_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs.append(open(os.path.join(out, "report.md")).read())
    assert os.path.exists(os.path.join(out, "report.png"))
  assert outputs[0] == outputs[1]
  assert "| `zs/top1` | 0.2000 | 0.3000 | +50.0% | 0.1000 | -50.0% |" in outputs[0]
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "report.py"),
                        f"--workdirs={tmp_path / 'missing'}"], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and "no metrics.jsonl rows" in bad.stderr
