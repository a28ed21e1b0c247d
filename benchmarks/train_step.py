"""Train-step speed and memory: compile time, step time, examples/s, achieved FLOP/s and the
compiled step's memory, for the demo towers and a small real variant, with and without heads.
Synthetic batches isolate the step from the input pipeline. Writes benchmarks/results/
train_step.json and prints a table.

  python benchmarks/train_step.py [--cases demo,demo_clipft,S16] [--steps 5] [--devices 1]
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step.json")

def case_config(name: str):
  from clipzoo_jax import config_base
  from clipzoo_jax import tasks as task_lib
  from clipzoo_jax.models import variants
  all_tasks = list(task_lib.names())
  if name in ("demo", "demo_clipft"):
    return config_base.demo_config(all_tasks if name == "demo" else [])
  if name in ("S16", "S16_clipft"):
    tasks = all_tasks if name == "S16" else []
    config = config_base.demo_config(tasks)
    config.model = variants.model_config("S/16", image_size=224, tasks=tasks,
                                         num_seg_classes=150, num_det_classes=80)
    config.data.image_size, config.data.label_size = 224, 56
    config.global_batch_size = 16
    config.tokenizer.context_length = 77
    config.loss.weights = {t: 1.0 for t in tasks}
    return config
  raise ValueError(f"unknown case {name!r}")


def measure(name: str, steps: int) -> dict:
  import jax
  import numpy as np
  from clipzoo_jax import run as run_lib

  config = case_config(name)
  config.total_steps = 1000
  run = run_lib.setup(config)
  start = time.perf_counter()
  compiled = run.compile()  # from the abstract state and batch: no data, no state yet
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state = run.init_state()
  batch = run.global_batch(run.synthetic_batch())
  state, metrics = run.train_step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  params = sum(x.size for x in jax.tree.leaves(run.abstract_state["params"]))
  return {
      "case": name, "variant": config.model.variant, "tasks": list(config.model.heads.tasks),
      "image_size": config.data.image_size, "global_batch": config.global_batch_size,
      "devices": jax.device_count(), "mesh": dict(run.mesh.shape), "params_millions": params / 1e6,
      "compile_s": compile_s, "step_s_median": step_s, "step_s_min": float(min(times)),
      "examples_per_s": config.global_batch_size / step_s,
      "gflop_per_step": flops / 1e9, "achieved_gflop_per_s": flops / 1e9 / step_s,
      "temp_mib": memory.temp_size_in_bytes / 2**20 if memory else None,
      "argument_mib": memory.argument_size_in_bytes / 2**20 if memory else None,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="demo,demo_clipft,S16,S16_clipft")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--devices", type=int, default=1, help="forced CPU host devices")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  import jax
  rows = [measure(name, args.steps) for name in args.cases.split(",")]
  result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "rows": rows}
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    json.dump(result, f, indent=1)
  header = ("case", "params M", "batch", "compile s", "step s", "ex/s", "GFLOP/step", "GFLOP/s",
            "temp MiB", "args MiB")
  print(" | ".join(header))
  for r in rows:
    print(" | ".join(str(v) for v in (
        r["case"], f"{r['params_millions']:.1f}", r["global_batch"], f"{r['compile_s']:.1f}",
        f"{r['step_s_median']:.3f}", f"{r['examples_per_s']:.1f}", f"{r['gflop_per_step']:.1f}",
        f"{r['achieved_gflop_per_s']:.1f}", f"{r['temp_mib']:.0f}", f"{r['argument_mib']:.0f}")))


if __name__ == "__main__":
  main()
