"""The pseudo-labelling job on a Ray cluster: the local runner's shards, handed out one at a time.

Ray core actors, not Ray Data: the unit of work is already a whole output shard (atomic write,
sidecar, skipped when complete), and a shard's bytes depend on its batches and record order, which
a streaming dataset would re-chunk. Each shard worker (an actor) builds every expert where it runs
(`num_gpus` of a GPU, a fraction letting small expert sets share one), decodes on its own CPU
threads with prefetch, and writes shards through the local runner's `ShardLabeller`, so both
runners write the same bytes. The driver hands the next incomplete shard to whichever worker is
free: a slow node delays only its own shard. Ray restarts a worker whose process died and retries
its shard, whose partial files the worker removes first; a worker that cannot be restarted leaves
its shard to the others. The driver writes the manifest exactly as the local runner does.

Every node must see the output directory (and the corpus) at the same path: a shared file system.
"""

from __future__ import annotations

import collections
import json
import math
import platform
import socket
from typing import Callable, Mapping, Sequence

import ray

from clipzoo_jax import cli
from clipzoo_jax.data import shards
from clipzoo_jax.experts import base
from clipzoo_jax.pseudo_label import config as config_lib
from clipzoo_jax.pseudo_label import corpus as corpus_lib
from clipzoo_jax.pseudo_label import job, report

LOCAL = ""  # --ray_address: start a Ray instance on this machine for this job only
MakeExperts = Callable[[], Mapping[str, base.Expert]]  # picklable, e.g. a functools.partial


class RayClusterError(cli.UserError):
  """No Ray cluster at the given address, or one without the resources the config asks for."""


class ShardWorker:
  """One Ray actor: the experts, built in the actor's process, and a `job.ShardLabeller`."""

  def __init__(self, corpus: corpus_lib.Corpus, make_experts: MakeExperts,
               options: job.JobOptions):
    experts = make_experts()
    self.entries = json.loads(json.dumps(job.manifest_entries(experts)))
    self.labeller = job.ShardLabeller(corpus, experts, options)

  def manifest_entries(self) -> dict:
    return self.entries

  def label(self, output_dir: str, name: str, part: corpus_lib.Slice, entries: Mapping) -> dict:
    """Writes shard `name`; returns its report. Refuses when this node's experts (weights, config
    files) are not those of the plan, which would mix labels."""
    changed = job.differences(entries, self.entries)
    if changed:
      raise job.JobError(f"Ray worker on {platform.node()}: its experts differ from the job's "
                         f"plan: {'; '.join(changed[:5])}. Give every node the same model files.")
    shards.remove_partial(output_dir, names=[name])  # left by an attempt whose process died
    quiet = report.ShardProgress(name, [part.count], lambda _: None, math.inf)
    return self.labeller.label(output_dir, name, part, quiet)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
  """Fails fast, in one line, on a HOST:PORT nothing listens on (ray.init would retry for long)."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise RayClusterError(f"--ray_address={address!r}: expected auto, HOST:PORT (the head node's "
                          "GCS address, port 6379 by default) or nothing for a local instance")
  try:
    socket.create_connection((host, int(port)), timeout=timeout_s).close()
  except OSError as e:
    raise RayClusterError(
        f"--ray_address={address}: no Ray head reachable there ({report.describe(e)}); start one "
        "with `ray start --head` on the head node, or use --ray_address=auto on a node of a "
        "running cluster") from None


def connect(address: str, log: Callable[[str], None]) -> bool:
  """Connects this process to the cluster at `address` (auto, HOST:PORT, or LOCAL); returns
  whether this call connected (so the caller disconnects), False when already connected."""
  if ray.is_initialized():
    return False
  if address not in (LOCAL, "auto"):
    check_reachable(address)
  try:
    context = ray.init(address=address or None, log_to_driver=True)
  except (ConnectionError, RuntimeError, ValueError) as e:
    raise RayClusterError(f"--ray_address={address or '(local)'}: cannot connect to Ray "
                          f"({report.describe(e).splitlines()[0]}); start a cluster with "
                          "`ray start --head` (see the README)") from None
  resources = ray.cluster_resources()
  dashboard = f"; dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
  log(f"ray: connected to {context.address_info['gcs_address']}: {len(ray.nodes())} nodes, "
      f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs{dashboard}")
  return True


def worker_capacity(options: config_lib.RayOptions, resources: Mapping[str, float]) -> int:
  """How many shard workers the cluster holds at once (config.ray.num_workers when set)."""
  if options.num_workers:
    return options.num_workers
  if options.num_gpus > resources.get("GPU", 0):
    raise RayClusterError(f"config.ray.num_gpus={options.num_gpus:g} per worker, but the cluster "
                          f"has {resources.get('GPU', 0):g} GPUs; set --config.ray.num_gpus=0 to "
                          "label on CPUs")
  if options.num_gpus:
    return max(1, int(resources["GPU"] / options.num_gpus + 1e-6))
  return max(1, int(resources.get("CPU", 1) / max(options.num_cpus, 1e-6) + 1e-6))


def _get(ref):
  """ray.get, re-raising a worker's user error (JobError, CorpusError, ...) as itself, one line."""
  try:
    return ray.get(ref)
  except ray.exceptions.RayTaskError as e:
    if e.cause is not None and cli.is_user_error(e.cause):
      raise e.cause from None
    raise


def run(corpus: corpus_lib.Corpus, make_experts: MakeExperts, output_dir: str,
        options: job.JobOptions = job.JobOptions(),
        ray_options: config_lib.RayOptions = config_lib.RayOptions(), address: str = LOCAL,
        command: str = "", log: Callable[[str], None] = print,
        settings: Mapping | None = None) -> dict | None:
  """Labels every incomplete shard of `output_dir` on the cluster at `address`; returns the
  manifest. `make_experts` runs in each worker."""
  connected = connect(address, log)
  worker_class = ray.remote(ShardWorker).options(
      num_cpus=ray_options.num_cpus, num_gpus=ray_options.num_gpus,
      max_restarts=ray_options.max_retries, max_task_retries=ray_options.max_retries)
  start = lambda: worker_class.remote(corpus, make_experts, options)
  workers = []
  try:
    capacity = worker_capacity(ray_options, ray.cluster_resources())
    workers.append(start())  # its experts' manifest entries fix (or check) the plan
    entries = _get(workers[0].manifest_entries.remote())
    plan, todo = job.plan_shards(output_dir, corpus, entries, options, settings, log=log,
                                 name="ray")
    workers += [start() for _ in range(min(capacity, len(todo)) - 1)]
    label_all(workers, plan, todo, entries, output_dir, options, log)
  finally:
    for worker in workers:
      ray.kill(worker)
    if connected:
      ray.shutdown()
  return job.finalize(output_dir, plan, command, log)


def label_all(workers: Sequence, plan: Mapping, todo: Sequence[int], entries: Mapping,
              output_dir: str, options: job.JobOptions, log: Callable[[str], None]) -> None:
  """Hands shards `todo` to free workers until all are written; a worker Ray could not bring
  back is dropped and its shard handed to another."""
  names, slices = job.shard_names(plan), job.plan_slices(plan)
  waiting, idle, running = collections.deque(todo), list(workers), {}
  progress = report.ShardProgress(f"ray ({len(workers)} workers)", [slices[i].count for i in todo],
                                  log, options.progress_every_s)
  while waiting or running:
    while idle and waiting:
      worker, i = idle.pop(), waiting.popleft()
      running[worker.label.remote(output_dir, names[i], slices[i], entries)] = (worker, i)
    done, _ = ray.wait(list(running), num_returns=1, timeout=options.progress_every_s)
    if not done:
      progress.print()
      continue
    worker, i = running.pop(done[0])
    try:
      shard_report = _get(done[0])
    except ray.exceptions.RayActorError as e:
      if not idle and not running:
        raise RayClusterError(f"ray: every shard worker is gone; the last one while writing "
                              f"{names[i]}: {report.describe(e).splitlines()[0]}") from None
      log(f"ray: the worker writing {names[i]} is gone; handing the shard to another worker")
      waiting.appendleft(i)
      continue
    progress.add(shard_report["read"], len(shard_report["bad"]))
    progress.shard_done()
    idle.append(worker)
