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
  config = config_base.demo_config(list(task_lib.names()))
  config.data.directory = str(tmp_path / "does_not_exist")
  built = run.setup(config)
  compiled = built.compile()
  assert not os.path.exists(config.data.directory)
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes > 0
  # the compiled step accepts exactly the contract: the state it will train and a synthetic batch
  state = built.init_state()
  new_state, metrics = compiled(state, built.global_batch(built.synthetic_batch()))
  assert int(new_state["step"]) == 1 and np.isfinite(float(metrics["loss"]))
  assert set(metrics) >= {f"loss/{t}" for t in task_lib.names()}


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
