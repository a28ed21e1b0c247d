"""The grain input pipeline: examples/s per core and scaling with workers, resume latency at the
start and the end of an epoch, and the share of a train step spent waiting for data.

Writes benchmarks/results/input_pipeline.json and prints a table. Usage:
  python benchmarks/input_pipeline.py [--records 256] [--batch 32] [--batches 24]

Cases (synthetic 224 px records with all four dense tasks, train augmentation, 56 px output
labels): labels stored at full resolution (224) and at 1/4 (56); the tf.data loader beside it.
Per-core rate: in-process with one decode thread (`num_workers=0, threads=1`), CPU ms/example from
this process's CPU time. Scaling: 1 and 2 worker processes (wall rate).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clipzoo_jax.data import pipelines, records  # noqa: E402
from clipzoo_jax.data.tokenizer import WordHashTokenizer  # noqa: E402
import loader as loader_bench  # noqa: E402  (its synthetic record writer)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "input_pipeline.json")


def _pipeline(directory, args, **data):
  config = {"directory": directory, "image_size": 224, "label_size": 56,
            "shuffle_buffer": args.records, **data}
  return pipelines.build(config, WordHashTokenizer(77, 49408), args.batch, list(records.TASKS))


def throughput_rows(directory, label_px, args) -> list[dict]:
  rows = []
  for name, data in (("grain, 1 core in-process", dict(num_workers=0, threads=1)),
                     ("grain, 1 worker", dict(num_workers=1)),
                     ("grain, 2 workers", dict(num_workers=2)),
                     ("tf.data (AUTOTUNE)", dict(loader="tfdata"))):
    pipeline = _pipeline(directory, args, **data)
    rate, cpu_ms = loader_bench.measure(pipeline, args.batches, warmup=2)
    pipeline.close()
    rows.append({"case": f"224px, labels {label_px}px: {name}", "stored_label_px": label_px,
                 "examples_per_s": round(rate, 1),
                 "cpu_ms_per_example_main_process": round(cpu_ms, 3)})
  return rows


def resume_rows(directory, args) -> list[dict]:
  """Seconds from set_state to the first batch, restored at the start and near the end of an
  epoch (and ten epochs in), with two workers: flat when resume does not replay records."""
  per_epoch = args.records // args.batch
  rows = []
  for label, batches in (("start of epoch 0", 1), ("end of epoch 0", per_epoch - 1),
                         ("end of epoch 9", 10 * per_epoch - 1)):
    probe = _pipeline(directory, args, num_workers=0, threads=1)
    state = probe.get_state()
    position = {"batches_yielded": batches, "skipped": 0, "iterator": None}
    # the in-process iterator state at `batches`: grain's index, set without reading the records
    iterator = iter(probe.dataset())
    grain_state = iterator.get_state()
    text = json.dumps(grain_state).replace('"next_index": 0',
                                           f'"next_index": {batches * args.batch}')
    position["iterator"] = text
    state["processes"] = [position]
    resumed = _pipeline(directory, args, num_workers=0, threads=1)
    start = time.perf_counter()
    resumed.set_state(json.loads(json.dumps(state)))
    next(resumed)
    rows.append({"case": f"resume at {label} (batch {batches})",
                 "seconds_to_first_batch": round(time.perf_counter() - start, 3)})
  return rows


def tokenization_rows(args) -> list[dict]:
  """A real CLIP BPE (trained on synthetic captions): per-example cost batched on the main
  thread (the tf.data loader) vs one caption at a time (the grain workers)."""
  from clipzoo_jax.data import toyworld, tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  captions = [toyworld.render_scene(0, index, 32).caption for index in range(256)]
  with tempfile.TemporaryDirectory() as directory:
    bpe = tokenizer_lib.train_tokenizer(captions, 2048, directory)
  start = time.perf_counter()
  for first in range(0, len(captions), args.batch):
    bpe.encode(captions[first:first + args.batch])
  batched = (time.perf_counter() - start) / len(captions)
  start = time.perf_counter()
  for caption in captions:
    bpe.encode([caption])
  single = (time.perf_counter() - start) / len(captions)
  return [{"case": f"tokenize, batches of {args.batch} (main thread)",
           "us_per_example": round(1e6 * batched, 1)},
          {"case": "tokenize, one caption per call (in the workers)",
           "us_per_example": round(1e6 * single, 1)}]


def step_wait_row(args) -> dict:
  """The demo's real train step fed by the grain loader: share of step time spent in next()."""
  from clipzoo_jax import run as run_lib, train  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  config = demo.get_config("evals=none")
  with tempfile.TemporaryDirectory() as workdir:
    run = run_lib.setup(config)
    pipeline = train.make_pipeline(config, workdir)
    state = run.init_state()
    for _ in range(3):  # compile and warm up
      state, _ = run.train_step(state, run.global_batch(next(pipeline)))
    waiting, steps, start = 0.0, 20, time.perf_counter()
    for _ in range(steps):
      before = time.perf_counter()
      batch = run.global_batch(next(pipeline))
      waiting += time.perf_counter() - before
      state, metrics = run.train_step(state, batch)
      metrics["loss"].block_until_ready()
    total = time.perf_counter() - start
    pipeline.close()
  return {"case": f"demo train step ({config.global_batch_size} x 64 px, "
                  f"{config.data.num_workers} workers)",
          "step_s": round(total / steps, 4), "waiting_share": round(waiting / total, 4)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=24)
  args = parser.parse_args(argv)
  rows = []
  for label_px in (224, 56):
    with tempfile.TemporaryDirectory() as directory:
      loader_bench.write_dataset(directory, args.records, 224, label_px)
      rows += throughput_rows(directory, label_px, args)
      if label_px == 224:
        rows += resume_rows(directory, args)
  rows += tokenization_rows(args)
  rows.append(step_wait_row(args))
  result = {"benchmark": "input_pipeline", "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "python": platform.python_version(), "rows": rows}
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{'case':<52} {'ex/s':>8} {'CPU ms/ex':>10} {'seconds':>8} {'wait share':>10} "
        f"{'us/ex':>7}")
  for row in rows:
    print(f"{row['case']:<52} {row.get('examples_per_s', ''):>8} "
          f"{row.get('cpu_ms_per_example_main_process', ''):>10} "
          f"{row.get('seconds_to_first_batch', row.get('step_s', '')):>8} "
          f"{row.get('waiting_share', ''):>10} {row.get('us_per_example', ''):>7}")
  print(f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; written to {RESULTS})")


if __name__ == "__main__":
  main()
