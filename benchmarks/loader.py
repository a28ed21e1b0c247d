"""Input pipeline throughput (examples/s) on synthetic records carrying every label.

Writes benchmarks/results/loader.json and prints a table. Usage:
  python benchmarks/loader.py [--records 256] [--batch 32] [--batches 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clipzoo_jax.data import loader, records, shards  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "loader.json")
# (name, stored image px, stored label px, output label px, train)
CASES = (
    ("64px, labels 64px", 64, 64, 16, True),
    ("224px, labels 224px", 224, 224, 56, True),
    ("224px, labels 56px", 224, 56, 56, True),
    ("224px, labels 224px, eval", 224, 224, 56, False),
)


class WordHashTokenizer:
  """Stands in for the real tokenizer so the numbers measure the pipeline alone."""

  def encode(self, texts):
    out = np.zeros((len(texts), 77), np.int32)
    for row, text in enumerate(texts):
      ids = [hash(word) % 49000 + 1 for word in text.split()][:77]
      out[row, :len(ids)] = ids
    return out


def _smooth(rng, size: int, channels: int, grain: float = 0.0) -> np.ndarray:
  """Photo-like content (so encoded sizes are realistic): upsampled coarse noise, plus grain."""
  coarse = rng.integers(0, 256, (8, 8, channels)).astype(np.uint8).squeeze()
  image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
  return np.clip(image + rng.normal(0, grain, image.shape), 0, 255)


def _labels(rng, size: int) -> records.Labels:
  seg = (_smooth(rng, size, 1) / 256 * 150).astype(np.int64)
  depth = _smooth(rng, size, 1) / 25.0 + 0.1
  normals = _smooth(rng, size, 3) / 127.5 - 1.0
  corners = np.sort(rng.uniform(0, 1, (8, 2, 2)), axis=1)
  boxes = corners.transpose(0, 2, 1).reshape(8, 4)[:, [0, 2, 1, 3]]
  return records.Labels(seg=seg, depth=depth, normals=normals, det_boxes=boxes,
                        det_classes=rng.integers(0, 80, 8), det_scores=rng.uniform(0, 1, 8))


def write_dataset(directory: str, num_records: int, image_px: int, label_px: int,
                  num_shards: int = 4) -> int:
  """Synthetic shards with every task; returns the mean record size in bytes."""
  rng = np.random.default_rng(0)
  paths, total_bytes = [], 0
  per_shard = num_records // num_shards
  for index in range(num_shards):
    path = os.path.join(directory, shards.shard_name("bench", index, num_shards))
    with shards.ShardWriter(path) as writer:
      for i in range(per_shard):
        key = f"{index}-{i}"
        jpeg = records.encode_jpeg(_smooth(rng, image_px, 3, grain=6.0).astype(np.uint8))
        example = records.make_example(key, jpeg, f"a synthetic photo number {i} of shard {index}",
                                       _labels(rng, label_px), num_seg_classes=150)
        total_bytes += len(example)
        writer.write(key, example)
    paths.append(path)
  tasks = {task: {"expert": {"name": "synthetic"}} for task in records.TASKS}
  shards.write_manifest(directory, tasks, paths, "benchmarks/loader.py")
  return total_bytes // (per_shard * num_shards)


def measure(pipeline, batches: int, warmup: int = 3) -> tuple[float, float]:
  """(examples per wall second, CPU milliseconds per example over all threads).

  CPU time per example is the steadier number on a machine shared with other jobs.
  """
  for _ in range(warmup):
    next(pipeline)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(pipeline)
  examples = batches * pipeline.local_batch_size
  return (examples / (time.perf_counter() - wall),
          1e3 * (time.process_time() - cpu) / examples)


def run_case(name, image_px, label_px, label_size, train, args) -> dict:
  with tempfile.TemporaryDirectory() as directory:
    record_bytes = write_dataset(directory, args.records, image_px, label_px)
    config = {"directory": directory, "image_size": image_px, "label_size": label_size,
              "shuffle_buffer": args.records}
    pipeline = loader.InputPipeline(config, WordHashTokenizer(), args.batch, list(records.TASKS),
                                    seed=0, process_index=0, process_count=1, train=train)
    batches = args.batches if train else min(args.batches, args.records // args.batch - 3)
    rate, cpu_ms = measure(pipeline, batches)
  return {"case": name, "image_px": image_px, "stored_label_px": label_px,
          "label_size": label_size, "train": train, "record_bytes": record_bytes,
          "batch": args.batch, "examples_per_s": round(rate, 1),
          "cpu_ms_per_example": round(cpu_ms, 3)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=40)
  args = parser.parse_args(argv)
  rows = [run_case(*case, args) for case in CASES]
  result = {"benchmark": "loader", "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "python": platform.python_version(), "rows": rows}
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{'case':<28} {'record KiB':>10} {'examples/s':>11} {'CPU ms/example':>15}")
  for row in rows:
    print(f"{row['case']:<28} {row['record_bytes'] / 1024:>10.1f} {row['examples_per_s']:>11.1f} "
          f"{row['cpu_ms_per_example']:>15.3f}")
  print(f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; written to {RESULTS})")


if __name__ == "__main__":
  main()
