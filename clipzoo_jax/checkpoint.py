"""Orbax checkpoints of a run: items `state` ({step, params, opt_state}) and `data` (the input
iterator's JSON state), under `<workdir>/checkpoints/<step>/`. Orbax commits a step atomically
(temporary directory renamed when complete), so a killed save never looks like a checkpoint."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"
CONFIG_NAME = "config.json"
# Orbax splits writes of replicated arrays across replicas; for small arrays each split costs a
# compiled slice (120 of them, ~6 s, for the demo on 8 CPU devices) and saves nothing.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


# The leaf types of a state or restored tree (Orbax's standard ones), each keeping Orbax's own
# handler; only jax.Array gets ours. Public API only: `get_type_handler` of each type.
STANDARD_LEAF_TYPES = (int, float, bytes, np.number, np.ndarray, str)


def type_handler_registry() -> ocp.type_handlers.TypeHandlerRegistry:
  """A registry of Orbax's handlers for the standard leaf types, with a jax.Array handler that
  splits replicated arrays across replicas only from MIN_REPLICA_PARALLEL_SLICE_BYTES on."""
  handlers = [(leaf_type, ocp.type_handlers.get_type_handler(leaf_type))
              for leaf_type in STANDARD_LEAF_TYPES]
  handlers.append((jax.Array, ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES)))
  return ocp.type_handlers.create_type_handler_registry(*handlers)


def _manager(workdir: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
  handlers = {STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=type_handler_registry()),
              DATA: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


class Checkpointer:
  """Saves when asked (the loop's `periodic.Every` decides when), keeps the newest `keep`,
  restores onto any mesh."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = _manager(workdir, options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> bool:
    """Starts saving `state` and the input iterator's `data_state` as checkpoint `step`."""
    return self.manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeSave(state), DATA: ocp.args.JsonSave(data_state)}), force=True)

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves with
    .sharding), which may be a different mesh or device count than the one that saved."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
        DATA: ocp.args.JsonRestore()}))
    return restored[STATE], restored[DATA]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_NAME), "w") as f:
      f.write(config.to_json_best_effort(indent=1))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no config; is {workdir} a training workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(workdir: str, step: int | None = None):
  """(params as host NumPy arrays, config) of a run's checkpoint: latest step unless given.

  Reads only the `params` subtree (partial restore), one copy in host memory, into the parameter
  tree the run's config describes (`run.abstract_params_and_specs`).
  """
  from clipzoo_jax import run as run_lib  # pylint: disable=import-outside-toplevel
  config = load_config(workdir)
  manager = _manager(workdir, ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"{checkpoint_dir(workdir)}: no checkpoint at step {step}; "
                            f"found steps {sorted(manager.all_steps())}")
  abstract_params, _ = run_lib.abstract_params_and_specs(config.model)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract_params)
  restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
      item={"params": abstract_params}, restore_args={"params": restore_args},
      partial_restore=True)}))
  manager.close()
  return restored[STATE]["params"], config
