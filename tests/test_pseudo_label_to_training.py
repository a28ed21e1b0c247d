"""The contract between stages: what the pseudo-labeller writes, the training loader reads back as
the same labels (the toy world's ground truth re-rendered from each record's key)."""

import os

import ml_collections
import numpy as np
import pytest

from clipzoo_jax.data import loader, tokenizer, toyworld
from clipzoo_jax.experts import base
from clipzoo_jax.pseudo_label import corpus as corpus_lib
from clipzoo_jax.pseudo_label import job
from tests.test_pseudo_label import quiet, toyworld_tars

TASKS = ("seg", "depth", "normals", "det")


@pytest.mark.slow
def test_loader_reads_pseudo_labels_as_written(tmp_path):
  size = 32
  pattern, keys = toyworld_tars(str(tmp_path), num_tars=2, per_tar=4, size=size)
  out = str(tmp_path / "labels")
  experts = base.build_experts({t: {"kind": "toyworld"} for t in TASKS})
  manifest = job.run_worker(corpus_lib.TarCorpus(pattern), experts, out, log=quiet)
  assert manifest["num_records"] == len(keys)

  captions = [toyworld.render_scene(0, i, size).caption for i in range(len(keys))]
  tok = tokenizer.train_tokenizer(captions, 600, str(tmp_path / "tok"), context_length=16)
  config = ml_collections.ConfigDict(dict(directory=out, image_size=size, label_size=size,
                                          max_boxes=8, shuffle_buffer=16))
  pipeline = loader.InputPipeline(config, tok, global_batch_size=len(keys), tasks=TASKS, seed=0,
                                  process_index=0, process_count=1, train=False)
  batch = next(iter(pipeline))
  assert sorted(pipeline.last_keys) == sorted(keys)
  for task in TASKS:
    np.testing.assert_array_equal(batch[f"{task}_mask"], 1.0)
  for i, key in enumerate(pipeline.last_keys):
    scene = toyworld.render_scene(*toyworld.parse_key(key), size)
    truth = scene.labels
    np.testing.assert_array_equal(batch["seg"][i], truth.seg)
    valid = truth.depth > 0
    step = truth.depth[valid].max() / 65535
    np.testing.assert_allclose(batch["depth"][i][valid], truth.depth[valid], atol=step)
    normal_valid = np.linalg.norm(truth.normals, axis=-1) > 0
    cosine = np.sum(batch["normals"][i] * truth.normals, -1)[normal_valid]
    assert cosine.min() > 0.999
    count = len(truth.det_classes)
    np.testing.assert_array_equal(batch["det_classes"][i][:count], truth.det_classes)
    np.testing.assert_allclose(batch["det_boxes"][i][:count], truth.det_boxes, atol=1e-6)
    assert (batch["det_classes"][i][count:] == -1).all()
    np.testing.assert_array_equal(batch["tokens"][i], tok.encode([scene.caption])[0])
