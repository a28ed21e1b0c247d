"""Toy-world generation speed on one core: rendering alone, and end to end (render, JPEG/PNG
encoding, TFRecord shards, manifest). Writes benchmarks/results/toyworld.json and prints a table.

  python benchmarks/toyworld.py [--sizes 64,96,128] [--count 400]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clipzoo_jax.data import toyworld  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "toyworld.json")


def render_rate(size: int, count: int) -> float:
  start = time.perf_counter()
  for index in range(count):
    toyworld.render_scene(0, index, size)
  return count / (time.perf_counter() - start)


def write_rate(size: int, count: int) -> float:
  with tempfile.TemporaryDirectory() as directory:
    start = time.perf_counter()
    toyworld.write_dataset(directory, count, seed=0, size=size, num_shards=4, verbose=False)
    return count / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="64,96,128")
  parser.add_argument("--count", type=int, default=400, help="images per measurement")
  args = parser.parse_args()
  # One core, as the target says; the generator itself is single-threaded.
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  write_rate(32, 8)  # warm-up: imports TensorFlow outside the timed runs
  rows = []
  for size in [int(s) for s in args.sizes.split(",")]:
    rows.append({"size": size, "count": args.count,
                 "render_images_per_s": round(render_rate(size, args.count), 1),
                 "write_images_per_s": round(write_rate(size, args.count), 1)})
  result = {"benchmark": "toyworld", "cores": 1, "machine": platform.machine(),
            "python": platform.python_version(), "load_average": os.getloadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{'size':>5} {'render img/s':>13} {'write img/s':>12} {'write img/min':>14}")
  for row in rows:
    render, write = row["render_images_per_s"], row["write_images_per_s"]
    print(f"{row['size']:>5} {render:>13.1f} {write:>12.1f} {write * 60:>14.0f}")
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
