"""The one setup path (`run.setup`): every shipped config and sweep point builds its optimizer and
abstract state in full form, the train step compiles from the config alone with no data, a
resume restores without initialising, and batches are checked against the batch contract."""

import ast
import glob
import os

import jax
import numpy as np
import pytest

from clipzoo_jax import checkpoint, config_base, run, sweep
from clipzoo_jax import tasks as task_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not p.endswith("__init__.py"))


def _config_points():
  """(id, config) of every shipped training config: its default and each sweep point, full size."""
  points = []
  for path in CONFIG_FILES:
    module = sweep.load_config_module(path)
    name = os.path.basename(path)
    points.append((name, module.get_config()))
    for point in sweep.expand(path):
      config = module.get_config(point.config.partition(":")[2] or None)
      config.update_from_flattened_dict(
          {k: ast.literal_eval(v) if isinstance(v, str) else v for k, v in point.overrides.items()})
      points.append((f"{name}:{point.name}", config))
  return points


POINTS = _config_points()


def test_every_config_file_is_covered():
  assert {p.split(":")[0] for p, _ in POINTS} == {os.path.basename(p) for p in CONFIG_FILES}
  assert any(p == "cliptex.py:tasks=none" for p, _ in POINTS)


@pytest.mark.parametrize("name,config", POINTS, ids=[p for p, _ in POINTS])
def test_full_config_builds_optimizer_and_abstract_state(name, config):
  """Not the runlocal shrink: the config as a pod job would run it, up to its abstract state."""
  built = run.setup(config)
  params = built.abstract_state["params"]
  assert set(params) >= {"img", "txt", "logit_scale"}
  assert ("heads" in params) == bool(list(config.model.heads.tasks)), name
  # the optimizer's state and shardings cover every parameter
  assert len(jax.tree.leaves(built.abstract_state["opt_state"])) >= len(jax.tree.leaves(params))
  assert all(isinstance(x.sharding, jax.sharding.NamedSharding)
             for x in jax.tree.leaves(built.abstract_state))
  batch = built.abstract_batch
  assert batch["image"].shape == (config.global_batch_size, config.model.image.image_size,
                                  config.model.image.image_size, 3)
  for task in config.model.heads.tasks:
    assert f"{task}_mask" in batch


def test_train_step_compiles_from_the_config_alone(tmp_path):
  """No data directory, no state: jit(...).lower(abstract_state, abstract_batch).compile()."""
  config = helpers.tiny_config()
  config.data.directory = str(tmp_path / "does_not_exist")
  built = run.setup(config)
  compiled = built.compile()
  assert not os.path.exists(config.data.directory)
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes > 0
  # the compiled step accepts exactly the contract: the state it will train and a synthetic batch
  state = built.init_state()
  batch = built.global_batch(built.synthetic_batch())
  before = jax.tree.map(np.asarray, state)  # the step donates its state
  new_state, metrics = compiled(state, batch)
  assert int(new_state["step"]) == 1 and np.isfinite(float(metrics["loss"]))
  assert float(metrics["train/skipped_nonfinite"]) == 0.0
  assert set(metrics) >= {f"loss/{t}" for t in task_lib.names()}
  assert any(not np.array_equal(a, b) for a, b in zip(  # a finite step updates the moments
      jax.tree.leaves(before["opt_state"]), jax.tree.leaves(new_state["opt_state"])))

  # a step whose loss is not finite applies nothing: parameters and optimizer state come back
  # exactly as they went in, and the step is counted as skipped
  poisoned = jax.tree.map(np.asarray, new_state)
  poisoned["params"]["logit_scale"] = np.full_like(poisoned["params"]["logit_scale"], np.nan)
  placed = jax.tree.map(jax.device_put, poisoned, jax.tree.map(lambda a: a.sharding,
                                                               built.abstract_state))
  after, metrics = compiled(placed, batch)
  assert not np.isfinite(float(metrics["loss"]))
  assert float(metrics["train/skipped_nonfinite"]) == 1.0 and int(after["step"]) == 2
  for name in ("params", "opt_state"):
    for kept, went_in in zip(jax.tree.leaves(after[name]), jax.tree.leaves(poisoned[name]),
                             strict=True):
      np.testing.assert_array_equal(np.asarray(kept), went_in)


def test_resume_restores_without_initialising(tmp_path, monkeypatch):
  config = helpers.tiny_config()
  saved_run = helpers.run_on(config, [2, 2, 2])
  saved = saved_run.init_state()
  writer = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  writer.save(7, saved, {"batches_yielded": 7})
  writer.close()

  resumed_run = helpers.run_on(config, [4, 2, 1])

  def no_init():
    raise AssertionError("a resume must not initialise the state it restores over")

  monkeypatch.setattr(resumed_run, "init_state", no_init)
  state, data_state, step = resumed_run.restore_or_init(checkpoint.Checkpointer(str(tmp_path)))
  assert (step, data_state) == (7, {"batches_yielded": 7})
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for leaf, abstract in zip(jax.tree.leaves(state), jax.tree.leaves(resumed_run.abstract_state)):
    assert leaf.sharding == abstract.sharding


def test_fresh_start_initialises_at_step_zero(tmp_path):
  built = helpers.run_on(helpers.tiny_config(), [2, 2, 2])
  state, data_state, step = built.restore_or_init(checkpoint.Checkpointer(str(tmp_path)))
  assert (step, data_state, int(state["step"])) == (0, None, 0)


def test_batches_are_checked_against_the_contract():
  built = helpers.run_on(helpers.tiny_config(tasks=("seg", "det")), [2, 2, 2])
  local = built.synthetic_batch()
  assert sorted(local) == sorted(built.abstract_batch)
  built.global_batch(local)
  with pytest.raises(ValueError, match=r"'seg'.*expected int32\[32, 16, 16\].*found int32\[32, 8, 8\]"):
    built.global_batch({**local, "seg": local["seg"][:, :8, :8]})
  with pytest.raises(ValueError, match=r"missing \['det_mask'\]"):
    built.global_batch({k: v for k, v in local.items() if k != "det_mask"})


def test_config_errors_name_the_keys():
  config = helpers.tiny_config()
  config.tokenizer.context_length = 9
  with pytest.raises(ValueError, match="config.tokenizer.context_length 9 differs"):
    run.setup(config)
  config = helpers.tiny_config()
  config.model.heads.tasks = ["seg", "edges"]
  with pytest.raises(ValueError, match="config.model.heads.tasks: unknown task 'edges'"):
    run.setup(config)


def _small_demo(tmp_path, tasks=tuple(task_lib.names())):
  config = config_base.demo_config(list(tasks))
  config.data.toyworld.num_examples, config.data.toyworld.num_shards = 32, 2
  config.global_batch_size = 16
  return config


def test_the_loader_fills_exactly_the_batch_contract(tmp_path):
  from clipzoo_jax import train
  config = _small_demo(tmp_path)
  built = run.setup(config)
  pipeline = train.make_pipeline(config, str(tmp_path))
  batch = built.global_batch(next(iter(pipeline)))
  assert sorted(batch) == sorted(built.abstract_batch)


def test_dataset_classes_must_fit_the_heads(tmp_path):
  manifest = {"tasks": {"seg": {"classes": [f"c{i}" for i in range(150)]},
                        "det": {"classes": ["a", "b"]}}}
  model = config_base.demo_config(["seg", "det"]).model
  model.heads.num_seg_classes = 6
  with pytest.raises(ValueError, match=r"m.json: task 'seg' has 150 classes \(c0, c1, c2, c3, c4, "
                                       r"\.\.\.\) but config.model.heads.num_seg_classes is 6; set "
                                       r"--config.model.heads.num_seg_classes=150"):
    task_lib.check_dataset(["seg", "det"], manifest, model, "m.json")
  manifest["tasks"]["seg"]["classes"] = ["x"] * 6
  task_lib.check_dataset(["seg", "det"], manifest, model, "m.json")  # fewer det classes: fine
  with pytest.raises(ValueError, match=r"task 'depth' of config.model.heads.tasks is not in"):
    task_lib.check_dataset(["depth"], manifest, model, "m.json")


def test_data_directory_alone_points_a_toyworld_config_at_other_shards(tmp_path):
  """`--config.data.directory=DIR` is enough: a directory holding pseudo-labelled shards is used
  as it is, even by a config that generates the toy world where there is no data."""
  import json
  from clipzoo_jax.data import prepare, shards, toyworld
  labelled = str(tmp_path / "labelled")
  toyworld.write_dataset(labelled, num_examples=8, seed=3, size=32, num_shards=1, split="train")
  path = os.path.join(labelled, shards.MANIFEST_NAME)
  with open(path) as f:
    manifest = json.load(f)
  del manifest["toyworld"]  # as the pseudo-labelling job writes it
  with open(path, "w") as f:
    json.dump(manifest, f)
  config = _small_demo(tmp_path)
  config.data.directory = labelled
  assert prepare.prepare_dataset(config.data, str(tmp_path / "work")) == labelled
  assert sorted(os.listdir(labelled)) == sorted(
      [shards.MANIFEST_NAME] + [n for n in os.listdir(labelled) if n != shards.MANIFEST_NAME])
  assert shards.read_manifest(labelled)["num_records"] == 8  # nothing generated over it


def test_training_refuses_an_end_of_text_id_its_tokenizer_never_writes(tmp_path):
  from clipzoo_jax import train
  config = _small_demo(tmp_path, tasks=())
  config.model.text.eos_token_id = 49407  # transformers' default, outside the demo's 1024 ids
  with pytest.raises(ValueError, match=r"config.model.text.eos_token_id: 49407 is outside the "
                                       r"vocabulary \(vocab_size 1024\)"):
    train.make_pipeline(config, str(tmp_path))
