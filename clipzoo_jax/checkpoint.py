"""Orbax checkpoints of a run: items `state` ({step, params, opt_state}), `data` (the input
iterator's JSON state) and `integrity` (checksums of the state), under
`<workdir>/checkpoints/<step>/`, on local disk or in a bucket (`gs://`: Orbax writes through
TensorStore's GCS driver and etils.epath).

Orbax commits a step atomically (locally a temporary directory renamed when complete; in a bucket
a `commit_success.txt` written last), so a killed save never looks like a checkpoint. What can
still go wrong on disk (a file deleted, truncated or with a flipped byte) is caught at restore: a
step that does not restore, or whose contents differ from the checksums recorded when it was
saved, is reported, set aside under `checkpoints_damaged/`, and the previous step is restored
instead.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from clipzoo_jax import cli
from clipzoo_jax import storage

log = logging.getLogger(__name__)

STATE, DATA, INTEGRITY = "state", "data", "integrity"
INTEGRITY_VERSION = 1
CONFIG_NAME = "config.json"
# Orbax splits writes of replicated arrays across replicas; for small arrays each split costs a
# compiled slice (120 of them, ~6 s, for the demo on 8 CPU devices) and saves nothing.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), "checkpoints")


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
              DATA: ocp.JsonCheckpointHandler(), INTEGRITY: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


class CheckpointError(cli.UserError):
  """A checkpoint directory that cannot be written, or no checkpoint that can be restored."""


def _leaf_checksum(x):
  """Sum of the leaf's bit patterns modulo 2**32: independent of sharding and summation order,
  and changed by any single flipped bit."""
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, unsigned)
  if bits.dtype.itemsize == 8:
    bits = (bits ^ (bits >> 32)).astype(jnp.uint32)
  return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state) -> dict[str, int]:
  """{leaf path: checksum} of a (sharded) state, computed where the state lives."""
  sums = jax.device_get(_checksums(state))
  return {jax.tree_util.keystr(path): int(value)
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
  return f"{type(error).__name__}: {text[:limit]}"


def _probe_writable(directory: str) -> None:
  """Fails now, naming the directory, where Orbax would wait 300 s on a barrier and then fail.
  In a bucket the probe is an object written and deleted (a missing bucket, no permission)."""
  try:
    if storage.is_url(directory):
      probe = storage.join(directory, f".write-probe-{os.getpid()}")
      storage.write_bytes(probe, b"")
      storage.remove(probe)
      return
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    os.mkdir(probe)
    os.rmdir(probe)
  except OSError as error:
    reason = storage.bucket_problem(directory) or _first_line(error)
    raise CheckpointError(f"{directory}: checkpoints cannot be written there ({reason}); fix the "
                          "directory or pass another --workdir") from None


class Checkpointer:
  """Saves when asked (the loop's `periodic.Every` decides when), keeps the newest `keep`,
  restores onto any mesh, and falls back past damaged checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.workdir = workdir
    self.directory = checkpoint_dir(workdir)
    if jax.process_index() == 0:
      _probe_writable(self.directory)
    self.options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                enable_async_checkpointing=async_save)
    self.manager = _manager(workdir, self.options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> bool:
    """Starts saving `state`, its checksums and the input iterator's `data_state` as `step`."""
    integrity = {"version": INTEGRITY_VERSION, "checksums": state_checksums(state)}
    return self.manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeSave(state), DATA: ocp.args.JsonSave(data_state),
        INTEGRITY: ocp.args.JsonSave(integrity)}), force=True)

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves with
    .sharding), which may be a different mesh or device count than the one that saved, and
    checks the state against the checksums recorded at save (when the step has them)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    items = {STATE: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
             DATA: ocp.args.JsonRestore()}
    verify = storage.isdir(storage.join(self.directory, str(step), INTEGRITY))
    if verify:
      items[INTEGRITY] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if verify:
      self._verify(step, restored[STATE], restored[INTEGRITY])
    return restored[STATE], restored[DATA]

  def _verify(self, step: int, state, integrity: dict) -> None:
    expected, found = integrity["checksums"], state_checksums(state)
    wrong = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if wrong:
      raise CheckpointError(f"{storage.join(self.directory, str(step))}: {len(wrong)} arrays "
                            f"differ from the checksums recorded when it was saved: {wrong[:4]}"
                            f"{' ...' if len(wrong) > 4 else ''}")

  def restore_latest(self, abstract_state):
    """(state, data state, step) of the newest checkpoint that restores intact, or None when
    there is none. Damaged newer steps are reported and set aside; when every step fails (e.g.
    the config no longer matches), the error lists why each one did."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as error:  # noqa: BLE001  (any damage: missing, truncated, wrong files)
        failures.append((step, _first_line(error)))
        log.warning("checkpoint %d does not restore (%s); trying the previous one", step,
                    failures[-1][1])
        continue
      if failures:
        self._set_aside([failed for failed, _ in failures])
      return state, data_state, step
    if failures:
      raise CheckpointError(f"{self.directory}: no checkpoint restores: " + "; ".join(
          f"step {step}: {reason}" for step, reason in failures))
    return None

  def _set_aside(self, steps) -> None:
    """Moves damaged steps to `<workdir>/checkpoints_damaged/` (kept for inspection), so a later
    save of the same step number does not collide with them."""
    self.wait()
    if jax.process_index() == 0:
      damaged = storage.join(storage.dirname(self.directory), "checkpoints_damaged")
      storage.makedirs(damaged)
      for step in steps:
        target = storage.join(damaged, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        storage.move_tree(storage.join(self.directory, str(step)), target)
        log.warning("set the damaged checkpoint %d aside: %s", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints_set_aside")
    self.manager.close()
    self.manager = _manager(self.workdir, self.options)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, CONFIG_NAME), config.to_json_best_effort(indent=1))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = storage.join(workdir, CONFIG_NAME)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path}: no config; is {workdir} a training workdir?")
  return ml_collections.ConfigDict(json.loads(storage.read_text(path)))


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
