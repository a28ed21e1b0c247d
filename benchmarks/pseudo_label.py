"""Pseudo-labelling throughput: the whole job, local and on Ray, vs the experts' own forward passes.

The experts are small random models (a SegFormer-B0-sized segmenter and a small DPT), saved and
loaded like real ones. "Forward alone" is each expert's prepare + run (preprocessing, model,
post-processing) on pre-decoded images in the job's batches, timed per expert; "job" is the local
runner (`run_worker`) or the Ray runner (`ray_runner.run`, one local Ray instance) from a
webdataset tar to finished shards (reading, JPEG decoding, PNG encoding, TFRecord writing,
manifest). The Ray job's wall time includes starting its worker (importing TensorFlow and torch,
loading the experts); the same call on the finished directory measures that start alone, and
"ray labelling" is the difference. The overhead is job time / forward time - 1; the target is
<= 10%. Writes benchmarks/results/pseudo_label.json.

  python benchmarks/pseudo_label.py [--images=96 --size=160 --batch_size=8 --device=auto]
"""

import argparse
import functools
import io
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time
import warnings
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", message=".*requires torchvision.*")

import numpy as np

from clipzoo_jax.data import records
from clipzoo_jax.experts import base, tiny
from clipzoo_jax.pseudo_label import config as config_lib
from clipzoo_jax.pseudo_label import corpus as corpus_lib
from clipzoo_jax.pseudo_label import job

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pseudo_label.json")


def make_corpus(directory: str, images: list[np.ndarray]) -> str:
  path = os.path.join(directory, "00000.tar")
  with tarfile.open(path, "w") as tar:
    for i, image in enumerate(images):
      for name, data in ((f"{i:06d}.jpg", records.encode_jpeg(image, 90)),
                         (f"{i:06d}.txt", f"caption {i}".encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return path


def expert_configs(directory: str, size: int, device: str) -> dict:
  segformer = tiny.save_segformer(os.path.join(directory, "segformer"), num_labels=150,
                                  image_size=size, hidden_sizes=(32, 64, 160, 256),
                                  depths=(2, 2, 2, 2), decoder=256)
  dpt = tiny.save_dpt(os.path.join(directory, "dpt"), image_size=size, hidden=192, layers=4)
  return {"seg": {"kind": "hf_semantic", "source": segformer, "device": device},
          "depth": {"kind": "hf_depth", "source": dpt, "device": device, "label_scale": 0.5}}


def time_forward(experts: dict, images: list[np.ndarray], batch_size: int) -> dict[str, float]:
  """Seconds of each expert's prepare + run over all images, in the job's batches and order."""
  seconds = dict.fromkeys(experts, 0.0)
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    batch = base.Batch([str(k) for k in range(len(chunk))], chunk, [records.Labels() for _ in chunk])
    for task, expert in experts.items():
      start = time.perf_counter()
      produced = expert.run([expert.prepare(image, key) for image, key in zip(chunk, batch.keys)],
                            batch)
      seconds[task] += time.perf_counter() - start
      for merged, labels in zip(batch.labels, produced):
        job.merge_labels(merged, labels, task)  # as label_batch does
  return seconds


def in_job_breakdown(output_dir: str) -> dict[str, float]:
  """The shard reports' seconds (total, experts, waiting), summed over shards."""
  names = [n for n in sorted(os.listdir(output_dir)) if n.endswith(".report.json")]
  total: dict[str, float] = {}
  for name in names:
    with open(os.path.join(output_dir, name)) as f:
      for key, value in json.load(f)["seconds"].items():
        total[key] = total.get(key, 0.0) + value
  return total


def timed(run: Callable[[], object]) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=96)
  parser.add_argument("--size", type=int, default=160, help="model input size (square)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--decode_threads", type=int, default=2)
  parser.add_argument("--records_per_shard", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--device", default="auto")
  parser.add_argument("--ray_cpus", type=float, default=0, help="per Ray worker; 0: all CPUs")
  parser.add_argument("--ray_gpus", type=float, default=0, help="per Ray worker")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  import tensorflow  # noqa: F401  (imported before any timing)
  import torch
  import ray
  from clipzoo_jax.pseudo_label import ray_runner

  ray.init(include_dashboard=False, log_to_driver=False,
           runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
  ray_options = config_lib.RayOptions(num_workers=1, num_cpus=args.ray_cpus or os.cpu_count(),
                                      num_gpus=args.ray_gpus)
  with tempfile.TemporaryDirectory() as directory:
    configs = expert_configs(directory, args.size, args.device)
    experts = base.build_experts(configs)
    images = tiny.random_images(0, [(args.size, args.size + args.size // 4)] * args.images)
    corpus = corpus_lib.TarCorpus(make_corpus(directory, images), args.records_per_shard)
    decoded = [records.decode_jpeg(records.encode_jpeg(image, 90)) for image in images]
    options = job.JobOptions(batch_size=args.batch_size, decode_threads=args.decode_threads)
    time_forward(experts, decoded[:args.batch_size], args.batch_size)  # warm-up
    runs = {"forward": [], "local": [], "ray": [], "ray_start": []}
    breakdowns = {"local": [], "ray": []}
    for repeat in range(args.repeats):  # interleaved, so load changes hit all alike
      runs["forward"].append(time_forward(experts, decoded, args.batch_size))
      local = os.path.join(directory, f"local{repeat}")
      runs["local"].append(timed(lambda: job.run_worker(corpus, experts, local, options,
                                                        log=lambda _: None)))
      breakdowns["local"].append(in_job_breakdown(local))
      distributed = os.path.join(directory, f"ray{repeat}")
      run_ray = lambda: ray_runner.run(corpus, functools.partial(base.build_experts, configs),
                                       distributed, options, ray_options, log=lambda _: None)
      runs["ray"].append(timed(run_ray))
      runs["ray_start"].append(timed(run_ray))  # the directory is complete: start, plan, manifest
      breakdowns["ray"].append(in_job_breakdown(distributed))
    names = {task: expert.manifest_entry()["expert"]["name"] for task, expert in experts.items()}
  ray.shutdown()
  device = next(iter(experts.values())).model.device
  result = summarize(args, runs, breakdowns, names, device, torch.get_num_threads())
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print_table(result)
  print(f"written to {args.out}")


def summarize(args, runs: dict, breakdowns: dict, experts: dict[str, str], device,
              threads: int) -> dict:
  """Per-expert and whole-job images/s and overheads, from the least disturbed repeat of each
  (the machine may be shared); medians and the in-job breakdown as load-robust second views."""
  forward = [sum(seconds.values()) for seconds in runs["forward"]]
  forward_s = min(forward)
  per_expert = {task: min(r[task] for r in runs["forward"]) for task in experts}
  ray_labelling = [whole - start for whole, start in zip(runs["ray"], runs["ray_start"])]
  least_disturbed = lambda runner: breakdowns[runner][runs[runner].index(min(runs[runner]))]
  breakdown = {runner: least_disturbed(runner) for runner in breakdowns}
  images = args.images
  overhead = lambda seconds: 100.0 * (seconds / forward_s - 1.0)
  return {
      "device": str(device) if device.type != "cpu" else f"cpu ({os.cpu_count()} cores, "
                                                         f"torch threads {threads})",
      "host": platform.node(),
      "experts": experts,
      "images": images, "image_size": [args.size, args.size + args.size // 4],
      "shards": -(-images // args.records_per_shard), "batch_size": args.batch_size,
      "decode_threads": args.decode_threads, "repeats": args.repeats,
      "seconds": dict(runs, ray_labelling=ray_labelling),
      "forward_images_per_s": {task: images / s for task, s in per_expert.items()},
      "forward_images_per_s_all_experts": images / forward_s,
      "job_images_per_s": {"local": images / min(runs["local"]),
                           "ray": images / min(runs["ray"]),
                           "ray_labelling": images / min(ray_labelling)},
      "overhead_percent": {"local": overhead(min(runs["local"])),
                           "ray": overhead(min(runs["ray"])),
                           "ray_labelling": overhead(min(ray_labelling))},
      "overhead_percent_median": {
          "local": 100.0 * (statistics.median(runs["local"]) / statistics.median(forward) - 1),
          "ray_labelling": 100.0 * (statistics.median(ray_labelling) / statistics.median(forward) - 1)},
      "overhead_percent_in_job": {runner: 100.0 * (b["total"] / b["experts"] - 1.0)
                                  for runner, b in breakdown.items()},
      "ray_start_seconds": min(runs["ray_start"]),
      "job_breakdown_seconds": breakdown,
  }


def print_table(result: dict) -> None:
  images, seconds = result["images"], result["seconds"]
  rows = [(f"expert {task} forward alone", images / rate, rate)
          for task, rate in result["forward_images_per_s"].items()]
  rows += [("all experts forward alone", images / result["forward_images_per_s_all_experts"],
            result["forward_images_per_s_all_experts"]),
           ("local job", min(seconds["local"]), result["job_images_per_s"]["local"]),
           ("ray job (with worker start)", min(seconds["ray"]), result["job_images_per_s"]["ray"]),
           ("ray job (labelling)", min(seconds["ray_labelling"]),
            result["job_images_per_s"]["ray_labelling"])]
  print(f"{'measure':<32}{'seconds':>10}{'images/s':>12}{'overhead':>10}")
  overheads = {"local job": "local", "ray job (with worker start)": "ray",
               "ray job (labelling)": "ray_labelling"}
  for name, secs, rate in rows:
    extra = f"{result['overhead_percent'][overheads[name]]:>+9.1f}%" if name in overheads else ""
    print(f"{name:<32}{secs:>10.2f}{rate:>12.1f}{extra}")
  print(f"on {result['device']}, {result['shards']} shards; overhead target <= 10%; "
        f"ray worker start {result['ray_start_seconds']:.1f} s")
  for name, key in (("medians of repeats", "overhead_percent_median"),
                    ("in-job total vs expert time", "overhead_percent_in_job")):
    print(f"overhead, {name}: " + ", ".join(f"{runner} {value:+.1f}%"
                                            for runner, value in result[key].items()))


if __name__ == "__main__":
  main()
