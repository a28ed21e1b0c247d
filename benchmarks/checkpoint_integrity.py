r"""What the checkpoint checksums cost: `checkpoint.state_checksums` (computed at every save and
verified at every restore) over the full training state (params + AdamW moments) of real model
sizes, beside the bytes a save writes. Writes benchmarks/results/checkpoint_integrity.json and
prints a table.

  python benchmarks/checkpoint_integrity.py [--variants B/16,L/14] [--repeats 3]
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results", "checkpoint_integrity.json")


def measure(variant: str, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from clipzoo_jax import checkpoint, run, tasks
  from clipzoo_jax.models import variants
  model_config = variants.model_config(variant, tasks=tasks.names())
  abstract, _ = run.abstract_params_and_specs(model_config)
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 3 * len(jax.tree.leaves(abstract))))
  leaf = lambda x: jax.random.normal(next(keys), x.shape, jnp.float32)
  params = jax.tree.map(leaf, abstract)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": {"mu": jax.tree.map(leaf, abstract), "nu": jax.tree.map(leaf, abstract)}}
  jax.block_until_ready(state)
  checkpoint.state_checksums(state)  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    checkpoint.state_checksums(state)
    times.append(time.perf_counter() - start)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return {"variant": variant, "params_millions": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
          "state_gib": nbytes / 2**30, "checksum_s_min": min(times),
          "checksum_gib_per_s": nbytes / 2**30 / min(times),
          "device": jax.devices()[0].device_kind, "devices": jax.device_count()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="B/16,L/14")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  rows = [measure(v, args.repeats) for v in args.variants.split(",")]
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "rows": rows}, f, indent=1)
  print("variant | params M | state GiB | checksum s | GiB/s")
  for r in rows:
    print(f"{r['variant']} | {r['params_millions']:.0f} | {r['state_gib']:.2f} | "
          f"{r['checksum_s_min']:.2f} | {r['checksum_gib_per_s']:.1f}")


if __name__ == "__main__":
  main()
