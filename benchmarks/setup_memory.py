r"""Memory of starting a run: a fresh start (init) against a resume (restore straight into the
sharded abstract state), and the old resume (init, then restore over it) for comparison.

Each measurement runs in its own process, so its peak resident set size (RSS) is its own. The
per-device figure is the bytes of live jax.Array shards on the fullest device once the state
exists (host memory on CPU; `peak_bytes_in_use` too where the device reports it). Writes
benchmarks/results/setup_memory.json and prints a table.

  python benchmarks/setup_memory.py [--cases demo,S16] [--devices 8]
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

RESULTS = os.path.join(ROOT, "benchmarks", "results", "setup_memory.json")
MODES = ("fresh", "resume", "init_then_restore")
MIB = 2 ** 20


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _device_bytes(jax) -> dict:
  per_device = {d: 0 for d in jax.local_devices()}
  for array in jax.live_arrays():
    for shard in array.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"max_device_mib": max(per_device.values()) / MIB,
          "total_device_mib": sum(per_device.values()) / MIB,
          "device_peak_mib": stats.get("peak_bytes_in_use", 0) / MIB or None}


def child(mode: str, case: str, workdir: str) -> dict:
  """One measurement in this process: set up `case`, then start it as `mode` says."""
  import jax
  import train_step  # the benchmark's case configs
  from clipzoo_jax import checkpoint, run as run_lib
  jax.devices()
  baseline = _peak_rss_mib()
  config = train_step.case_config(case)
  config.total_steps = 1000
  run = run_lib.setup(config)
  checkpointer = checkpoint.Checkpointer(workdir, async_save=False)
  start = time.perf_counter()
  if mode == "fresh":
    state, _, step = run.restore_or_init(checkpointer)
    assert step == 0
  elif mode == "resume":
    state, _, step = run.restore_or_init(checkpointer)
    assert step == 1, f"no checkpoint to resume in {workdir}"
  else:  # what train() did before restore-before-init
    state = run.init_state()
    state, _ = checkpointer.restore(checkpointer.latest_step(), run.abstract_state)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  result = {"case": case, "mode": mode, "seconds": seconds, "baseline_rss_mib": baseline,
            "peak_rss_mib": _peak_rss_mib(), **_device_bytes(jax),
            "state_mib": sum(x.nbytes for x in jax.tree.leaves(state)) / MIB,
            "params_millions": sum(x.size for x in jax.tree.leaves(state["params"])) / 1e6}
  if mode == "fresh":
    checkpointer.save(1, state, {"batches_yielded": 0})  # the checkpoint the others resume
  checkpointer.close()
  return result


def measure(case: str, devices: int) -> list[dict]:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for mode in MODES:
      out = subprocess.run([sys.executable, __file__, "--child", mode, case, workdir], env=env,
                           capture_output=True, text=True, check=False)
      if out.returncode:
        raise RuntimeError(f"{case}/{mode} failed:\n{out.stderr[-3000:]}")
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="demo,S16")
  parser.add_argument("--devices", type=int, default=8, help="forced CPU host devices")
  parser.add_argument("--child", nargs=3, metavar=("MODE", "CASE", "WORKDIR"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(*args.child)))
    return
  rows = [row for case in args.cases.split(",") for row in measure(case, args.devices)]
  result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "devices": args.devices, "rows": rows}
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    json.dump(result, f, indent=1)
  header = ("case", "mode", "params M", "state MiB", "peak RSS MiB", "RSS over baseline",
            "max device MiB", "seconds")
  print(" | ".join(header))
  for r in rows:
    print(" | ".join(str(v) for v in (
        r["case"], r["mode"], f"{r['params_millions']:.1f}", f"{r['state_mib']:.0f}",
        f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f}",
        f"{r['max_device_mib']:.1f}", f"{r['seconds']:.1f}")))


if __name__ == "__main__":
  main()
