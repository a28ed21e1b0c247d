"""The toy world's model zoo (`tools/build_demo_zoo.py`): trained experts saved as downloaded ones
sit on disk, loaded by the pseudo-labelling job's own expert classes, better than untrained twins
on held-out scenes; a rerun does no work, other settings are refused, and the job labels a tar
corpus with the zoo through `configs/pseudo_label/demo_zoo.py`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clipzoo_jax import cli
from clipzoo_jax.data import records, toyworld
from clipzoo_jax.experts import base
from clipzoo_jax.miniature import zoo
from clipzoo_jax.pseudo_label import job
from tests.helpers import write_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A test-size zoo (seconds of training), built once for the module."""
  out = str(tmp_path_factory.mktemp("zoo"))
  lines = []
  result = zoo.build_zoo(out, seed=0, log=lines.append, _sizes="test")
  return out, result, lines


def test_folders_load_through_the_job_experts_and_the_report_is_reproducible(built):
  out, result, lines = built
  for name in ("segformer", "depth_anything", "rtdetr"):
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(
        os.listdir(os.path.join(out, name)))
  experts = base.build_experts(zoo.expert_configs(out))
  assert experts["seg"].classes == toyworld.SEG_CLASSES
  assert experts["det"].classes == toyworld.DET_CLASSES
  assert experts["depth"].depth_kind == "metric"  # read from the saved config, not told
  assert any("segformer: step 40/40 loss" in line and "ETA" in line for line in lines)
  with open(os.path.join(out, zoo.ZOO_FILE)) as f:
    assert json.load(f) == result
  # The stored held-out numbers are what the saved folders give on the held-out split.
  scenes = zoo.render_split(zoo.HELDOUT_SEED_BASE, zoo.SIZES["test"].heldout_scenes)
  tasks = ("seg", "depth", "normals", "det")
  again = zoo.heldout_metrics(zoo.label_scenes(zoo.expert_configs(out), scenes), scenes, tasks)
  assert again == {task: result["report"][task]["trained"] for task in tasks}


def test_trained_experts_beat_untrained_ones_on_held_out_scenes(built):
  _, result, _ = built
  report = result["report"]
  seg, depth = report["seg"], report["depth"]
  assert seg["trained"]["miou"] > seg["untrained"]["miou"] + 0.1
  assert seg["trained"]["pixel_accuracy"] > seg["untrained"]["pixel_accuracy"] + 0.3
  assert depth["trained"]["abs_rel"] < depth["untrained"]["abs_rel"] - 0.2
  assert depth["trained"]["delta1"] > depth["untrained"]["delta1"]
  normals = report["normals"]
  assert normals["trained"]["mean_angle_deg"] < normals["untrained"]["mean_angle_deg"]
  # A test-size detector is too short-trained for AP; its Hungarian loss must still fall.
  detector = result["experts"]["rtdetr"]
  assert detector["final_loss"] < 0.8 * detector["first_loss"]
  assert report["det"]["trained"]["ap50"] >= report["det"]["untrained"]["ap50"]
  assert "| seg | segformer |" in zoo.report_table(result)


def test_rerun_skips_finished_work_and_other_settings_are_refused(built):
  out, result, _ = built
  weights = os.path.join(out, "rtdetr", "model.safetensors")
  stamp = os.stat(weights).st_mtime_ns
  lines = []
  assert zoo.build_zoo(out, seed=0, log=lines.append, _sizes="test") == result
  assert sum("already built" in line for line in lines) == 3
  assert any("up to date" in line for line in lines)
  assert not any(": step " in line for line in lines)  # no training, not even resumed
  assert os.stat(weights).st_mtime_ns == stamp
  with pytest.raises(zoo.ZooError, match=r"built with seed=0, this run asks for seed=1") as error:
    zoo.build_zoo(out, seed=1, log=lines.append, _sizes="test")
  assert isinstance(error.value, cli.UserError) and "\n" not in str(error.value)
  assert os.stat(weights).st_mtime_ns == stamp


def test_pseudo_label_job_labels_a_tar_corpus_with_the_demo_zoo(built, tmp_path):
  out, _, _ = built
  for t in range(2):
    members = []
    for index in range(2 * t, 2 * t + 2):
      scene = toyworld.render_scene(3000, index)
      members += [(scene.key + ".jpg", records.encode_jpeg(scene.image)),
                  (scene.key + ".txt", scene.caption.encode())]
    write_tar(tmp_path / f"{t:05d}.tar", members)
  labelled = tmp_path / "labelled"
  # One intra-op thread: these models are tiny, and two threads on a busy 2-core machine wait
  # on each other for most of the run.
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1")
  command = [sys.executable, os.path.join(REPO, "tools", "pseudo_label.py"),
             f"--config=configs/pseudo_label/demo_zoo.py:zoo_dir={out}",
             f"--corpus=tar:{tmp_path}/{{00000..00001}}.tar", f"--output_dir={labelled}"]
  run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert job.verify_job(str(labelled)) == []
  with open(labelled / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["num_records"] == 4
  tasks = manifest["tasks"]
  assert tasks["seg"]["classes"] == list(toyworld.SEG_CLASSES)
  assert tasks["det"]["classes"] == list(toyworld.DET_CLASSES)
  assert tasks["depth"]["depth_kind"] == "metric"
  assert tasks["normals"]["from_depth_kind"] == "metric"
  assert tasks["seg"]["expert"]["source"] == os.path.join(out, "segformer")
