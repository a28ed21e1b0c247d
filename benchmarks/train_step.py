"""Train-step speed and memory, side by side in one run on this machine.

(a) speed: step time (median), examples/s, FLOPs per step (XLA's count of the unrolled step) and
    their share of the fp32 matmul peak that JAX reaches on this machine, measured in the same run
    (a 2048^3 matmul) — CLIP only and CLIPTeX with its four heads, at the shape of issue 11: both
    towers width 384, depth 6, 6 heads; 224 px, patch 16; context 77; vocab 49408; batch 32;
    AdamW; fp32; heads with 150 seg / 80 det classes and 56 px labels.
(b) the same step of Hugging Face `CLIPModel` (PyTorch, same shape, AdamW), eager and
    `torch.compile`d, in the same run; its share of the peak uses the same FLOP count as ours.
(bv) with --big_vision DIR (a checkout of google-research/big_vision): its two-tower model and
    the CLIP softmax loss at the same shape, one jitted optax AdamW step, in the same run.
(c) memory: per-device memory of the compiled CLIPTeX step on 8 host devices (a subprocess with
    8 forced CPU devices), replicated (mesh data=8) against FSDP (fsdp=8), under each remat
    policy, with gradient accumulation and with the chunked contrastive loss.

(gpu) where a GPU is present: the same (a) and (b) at B/16 (image 768 wide x 12, text 512 x 12),
    224 px, mixed precision (float32 parameters, bfloat16 matmuls), global batch --gpu_batch:
    CLIP only and CLIPTeX with each attention implementation, and HF CLIPModel under bf16
    autocast with PyTorch's SDPA attention, eager and torch.compile. MFU is FLOPs per step (XLA's
    count of the step with XLA attention, for every row) over the chip's dense bf16 peak
    (--gpu_peak_tflops, default the H100/H200 SXM datasheet's 989); a bf16 matmul's measured
    rate is recorded beside it.

Synthetic batches isolate the step from the input pipeline. Run it alone on the machine: two
cores shared with anything else give meaningless times.

  python benchmarks/train_step.py [--parts speed,torch,memory,gpu] [--steps 12] [--cases ...]
      [--big_vision DIR] [--profile DIR] [--gpu_batch 256] [--torch_modes eager,torch.compile]

Part gpu also times each step pipelined (steps dispatched back to back, synchronized once, as the
train loop runs them). --profile DIR traces 3 more steps of each of our rows and records where
their device time went (benchmarks/step_profile.py).

Writes benchmarks/results/train_step.json (each part's rows; a part rerun replaces its own rows)
and prints a table per part.
"""

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

RESULTS = os.path.join(ROOT, "benchmarks", "results", "train_step.json")
RESULTS_GPU = os.environ.get("CLIPZOO_GPU_RESULTS") or os.path.join(
    ROOT, "benchmarks", "results", "train_step_gpu.json")
SPEED_CASES = ("ref_clip", "ref_cliptex", "demo", "demo_clipft")
MEMORY_CASES = {  # name -> (mesh, remat, overrides)
    "replicated_none": ([8, 1, 1], "none", {}),
    "fsdp_none": ([1, 8, 1], "none", {}),
    "fsdp_full": ([1, 8, 1], "full", {}),
    "fsdp_dots_saveable": ([1, 8, 1], "dots_saveable", {}),
    "fsdp_dots_with_no_batch_dims_saveable": ([1, 8, 1], "dots_with_no_batch_dims_saveable", {}),
    "fsdp_none_accum2": ([1, 8, 1], "none", {"grad_accum_steps": 2}),
    "fsdp_none_chunk8": ([1, 8, 1], "none", {"loss.contrastive_chunk": 8}),
}


def reference_config(tasks):
  """The issue-11 shape (module docstring) as a clipzoo_jax config."""
  from clipzoo_jax import config_base  # pylint: disable=import-outside-toplevel
  config = config_base.shape_config("S/16", list(tasks), 32, depth=6)
  config.optim.lr_multipliers = []
  config.mesh, config.mesh_allow_shrink = [1, 1, 1], False
  config.total_steps = 1000
  return config


def case_config(name: str):
  from clipzoo_jax import config_base  # pylint: disable=import-outside-toplevel
  from clipzoo_jax import tasks as task_lib  # pylint: disable=import-outside-toplevel
  all_tasks = list(task_lib.names())
  if name in ("ref_clip", "ref_cliptex"):
    return reference_config(all_tasks if name == "ref_cliptex" else [])
  if name in ("demo", "demo_clipft"):
    config = config_base.demo_config(all_tasks if name == "demo" else [])
    config.mesh, config.mesh_allow_shrink = [1, 1, 1], False
    config.total_steps = 1000
    return config
  raise ValueError(f"unknown case {name!r}; known: {SPEED_CASES}")


GPU_CASES = {  # name -> (tasks: all or none, model.attention)
    "b16_clip": (False, "auto"),
    "b16_clip_xla_attention": (False, "heads_first"),
    "b16_cliptex": (True, "auto"),
}


def gpu_config(name: str, batch: int):
  """B/16 at 224 px, bfloat16 matmuls, AdamW, the issue-11 heads (150 seg / 80 det classes)."""
  from clipzoo_jax import config_base  # pylint: disable=import-outside-toplevel
  from clipzoo_jax import tasks as task_lib  # pylint: disable=import-outside-toplevel
  with_heads, attention = GPU_CASES[name]
  config = config_base.shape_config("B/16", list(task_lib.names()) if with_heads else [], batch)
  config.model.dtype, config.model.attention = "bfloat16", attention
  config.optim.lr_multipliers = []
  config.mesh, config.mesh_allow_shrink = [1, 1, 1], False
  config.total_steps = 1000
  return config


def _pipelined_time(step, sync, steps: int) -> float:
  """Seconds per step of `steps` steps dispatched back to back and synchronized once, as the
  train loop runs them (it reads each step's metrics one step behind)."""
  step()
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return (time.perf_counter() - start) / steps


def _median_time(fn, steps: int) -> tuple[float, float]:
  import numpy as np  # pylint: disable=import-outside-toplevel
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), float(min(times))


def matmul_peak_gflops(size: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
  """GFLOP/s of JAX's best case on the default device: one large square matmul (fp32 on the
  CPU; bf16 at 8192 on a GPU)."""
  import jax  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  median, _ = _median_time(lambda: jax.block_until_ready(matmul(a, a)), repeats)
  return 2 * size ** 3 / median / 1e9


def unrolled_flops(config) -> float:
  """XLA's FLOPs of the whole step (layers unrolled; these configs do not scan). Counted with
  XLA attention: cuDNN's fused attention is a custom call that XLA does not count."""
  from clipzoo_jax import run as run_lib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  config = config.copy_and_resolve_references()
  config.model.attention = "heads_first"
  # lowered on a host CPU device: XLA:GPU answers no cost analysis before compiling
  run = run_lib.setup(config, devices=jax.devices("cpu")[:1])
  return float(run.train_step.lower(run.abstract_state, run.abstract_batch).cost_analysis()["flops"])


def measure_jax(name: str, steps: int, peak: float, config=None, profile_dir=None,
                pipeline: bool = False) -> dict:
  """`peak` in GFLOP/s; `config` defaults to the CPU case of that name. With `profile_dir`, the
  row gets `profile`: where 3 more steps spent their device time (benchmarks/step_profile.py),
  their trace and HLO under profile_dir/name."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from clipzoo_jax import run as run_lib  # pylint: disable=import-outside-toplevel
  from clipzoo_jax.models import transformer as tfm  # pylint: disable=import-outside-toplevel
  config = config or case_config(name)
  run = run_lib.setup(config)
  start = time.perf_counter()
  compiled = run.compile()  # stepped directly: calling run.train_step would compile it again
  compile_s = time.perf_counter() - start
  flops = unrolled_flops(config)
  state = run.init_state()
  batch = run.global_batch(run.synthetic_batch())
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  holder = {"state": state}

  def step():
    holder["state"], out = compiled(holder["state"], batch)
    jax.block_until_ready(out)

  median, fastest = _median_time(step, steps)
  pipelined = None
  if pipeline:
    def dispatch():
      holder["state"], holder["metrics"] = compiled(holder["state"], batch)
    pipelined = _pipelined_time(dispatch, lambda: jax.block_until_ready(holder["metrics"]), steps)
  profile = None
  if profile_dir:
    import step_profile  # pylint: disable=import-outside-toplevel
    holder["state"], profile = step_profile.profile_step(
        compiled, holder["state"], batch, os.path.join(profile_dir, name))
    step_profile.print_summary(profile)
  params = sum(x.size for x in jax.tree.leaves(run.abstract_state["params"]))
  image = config.model.image
  attention = tfm.resolve_attention(config.model.get("attention", "auto"), jax.default_backend(),
                                    jnp.dtype(config.model.dtype), image.width // image.num_heads)
  return {"case": name, "implementation": "clipzoo_jax (jit)", "dtype": config.model.dtype,
          "attention": attention, "device": jax.devices()[0].device_kind,
          "tasks": list(config.model.heads.tasks), "image_size": config.data.image_size,
          "global_batch": config.global_batch_size, "params_millions": params / 1e6,
          "compile_s": compile_s, "step_s_median": median, "step_s_min": fastest,
          "examples_per_s": config.global_batch_size / median, "gflop_per_step": flops / 1e9,
          "share_of_matmul_peak": flops / 1e9 / median / peak,
          **(_pipelined_fields(pipelined, flops, peak)),
          **({"profile": profile} if profile else {})}


def _pipelined_fields(seconds, flops: float, peak: float) -> dict:
  if seconds is None:
    return {}
  return {"step_s_pipelined": seconds,
          "share_of_matmul_peak_pipelined": flops / 1e9 / seconds / peak}


def hf_clip_model(shape: str = "ref"):
  """Hugging Face CLIPModel (random weights; nothing is downloaded) of the reference shape, or
  B/16 (`b16`: image 768 x 12 / 12 heads, text 512 x 12 / 8 heads, embed 512)."""
  import transformers  # pylint: disable=import-outside-toplevel
  if shape == "b16":
    text, image, projection = (512, 12, 8), (768, 12, 12), 512
  else:
    text, image, projection = (384, 6, 6), (384, 6, 6), 384
  tower = lambda width, depth, heads: dict(hidden_size=width, intermediate_size=4 * width,
                                           num_hidden_layers=depth, num_attention_heads=heads,
                                           hidden_act="quick_gelu")
  config = transformers.CLIPConfig(
      text_config=dict(tower(*text), max_position_embeddings=77, vocab_size=49408),
      vision_config=dict(tower(*image), image_size=224, patch_size=16),
      projection_dim=projection)
  return transformers.CLIPModel(config)


def measure_torch(mode: str, steps: int, peak: float, flops: float, shape: str = "ref",
                  batch: int = 32, pipeline: bool = False) -> dict:
  """One AdamW step of HF CLIPModel with its contrastive loss, eager or torch.compile'd: float32
  on the CPU; on a GPU float32 parameters under bfloat16 autocast with SDPA attention (the mixed
  precision of our bfloat16 step). `peak` in GFLOP/s."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  if not cuda:
    torch.set_num_threads(os.cpu_count())
  model = hf_clip_model(shape).to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                **({"fused": True} if cuda else {}))
  forward = torch.compile(model) if mode == "torch.compile" else model
  pixels = torch.randn(batch, 3, 224, 224, device=device)
  tokens = torch.randint(1, 49407, (batch, 77), device=device)
  autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (
      contextlib.nullcontext)

  def dispatch():
    with autocast():
      loss = forward(input_ids=tokens, pixel_values=pixels, return_loss=True).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  sync = torch.cuda.synchronize if cuda else lambda: None

  def step():
    dispatch()
    sync()

  start = time.perf_counter()
  step()  # eager: warm-up; compile: traces and compiles
  step()
  compile_s = time.perf_counter() - start
  median, fastest = _median_time(step, steps)
  pipelined = _pipelined_time(dispatch, sync, steps) if pipeline else None
  params = sum(p.numel() for p in model.parameters())
  return {"case": "ref_clip" if shape == "ref" else "b16_clip",
          "implementation": f"Hugging Face CLIPModel, {mode}",
          "dtype": "bfloat16 autocast" if cuda else "float32",
          "attention": getattr(model.config, "_attn_implementation", None),
          "device": torch.cuda.get_device_name() if cuda else "cpu",
          "tasks": [], "image_size": 224, "global_batch": batch, "params_millions": params / 1e6,
          "compile_s": compile_s, "step_s_median": median, "step_s_min": fastest,
          "examples_per_s": batch / median, "gflop_per_step": flops / 1e9,
          "share_of_matmul_peak": flops / 1e9 / median / peak,
          **_pipelined_fields(pipelined, flops, peak), "torch": torch.__version__}


def measure_big_vision(checkout: str, steps: int, peak: float, flops: float) -> dict:
  """big_vision's two-tower model (google-research/big_vision, imported from the `checkout`
  directory; nothing of it is copied here) at the reference shape: its ViT (class token pooled,
  as CLIP) and its text transformer, both width 384, depth 6, 6 heads, MLP 1536; vocab 49408,
  context 77; projections to 384; the CLIP softmax loss over its learned temperature; optax AdamW;
  one jitted step, float32. `peak` in GFLOP/s; `flops`: our CLIP step's count (same shape)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(os.path.join(checkout, "big_vision", "models")):
    raise SystemExit(f"--big_vision {checkout!r}: expected a checkout of "
                     "google-research/big_vision (a directory holding big_vision/models)")
  sys.path.insert(0, os.path.abspath(checkout))
  from big_vision.models.proj.image_text import two_towers  # pylint: disable=import-outside-toplevel,import-error
  tower = dict(width=384, depth=6, mlp_dim=1536, num_heads=6)
  model = two_towers.Model(
      image=dict(tower, patch_size=(16, 16), pool_type="tok", posemb="learn"),
      text=dict(tower, vocab_size=49408), out_dim=384, temperature_init=1 / 0.07)
  batch = 32
  images = jax.random.normal(jax.random.PRNGKey(1), (batch, 224, 224, 3))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (batch, 77), 1, 49408)
  params = model.init(jax.random.PRNGKey(0), images[:1], tokens[:1])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.1)

  def loss_fn(params):
    zimg, ztxt, out = model.apply({"params": params}, images, tokens)
    logits = zimg @ ztxt.T * out["t"]
    labels = jnp.arange(batch)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2

  @jax.jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  holder = {"state": (params, tx.init(params))}
  start = time.perf_counter()
  compiled = train_step.lower(*holder["state"]).compile()
  compile_s = time.perf_counter() - start

  def step():
    *holder["state"], loss = compiled(*holder["state"])
    jax.block_until_ready(loss)

  step()
  median, fastest = _median_time(step, steps)
  revision = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or None
  return {"case": "ref_clip", "implementation": "big_vision two towers + softmax loss (jit)",
          "dtype": "float32", "device": jax.devices()[0].device_kind, "tasks": [],
          "image_size": 224, "global_batch": batch,
          "params_millions": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
          "compile_s": compile_s, "step_s_median": median, "step_s_min": fastest,
          "examples_per_s": batch / median, "gflop_per_step": flops / 1e9,
          "share_of_matmul_peak": flops / 1e9 / median / peak, "big_vision_revision": revision}


def memory_child(name: str) -> dict:
  """One memory case, in a process with 8 forced host devices."""
  from clipzoo_jax import run as run_lib  # pylint: disable=import-outside-toplevel
  from clipzoo_jax import tasks as task_lib  # pylint: disable=import-outside-toplevel
  mesh, remat, overrides = MEMORY_CASES[name]
  config = reference_config(list(task_lib.names()))
  config.mesh, config.model.remat = mesh, remat
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  memory = run_lib.setup(config).compile().memory_analysis()
  mib = lambda value: value / 2**20
  arguments, temporaries = mib(memory.argument_size_in_bytes), mib(memory.temp_size_in_bytes)
  outputs, aliased = mib(memory.output_size_in_bytes), mib(memory.alias_size_in_bytes)
  return {"case": name, "mesh": mesh, "remat": remat, "overrides": overrides, "devices": 8,
          "global_batch": config.global_batch_size, "arguments_mib": arguments,
          "temporaries_mib": temporaries, "outputs_mib": outputs, "aliased_mib": aliased,
          "total_mib": arguments + outputs - aliased + temporaries}


def measure_memory(name: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory_child", name],
                          env=env, capture_output=True, text=True, check=False)
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode or not lines:
    return {"case": name, "error": (result.stderr.strip().splitlines() or ["?"])[-1]}
  return json.loads(lines[-1])


def save(part: str, rows: list, extra: dict) -> None:
  """Into RESULTS, or RESULTS_GPU for part gpu (a file per machine: each records its machine)."""
  path = RESULTS_GPU if part == "gpu" else RESULTS
  saved = {}
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if "parts" not in saved:  # an older layout of this file: start over
      saved = {}
  import jax  # pylint: disable=import-outside-toplevel
  saved.update({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "backend": jax.default_backend()})
  saved.setdefault("parts", {})[part] = {"rows": rows, **extra}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(saved, f, indent=1)
  os.replace(path + ".tmp", path)


def measure_gpu(args, save_rows) -> list:
  """Part (gpu): each row's share_of_matmul_peak is its MFU against --gpu_peak_tflops. Ours and
  PyTorch's rows alternate, and every row is saved as it comes, so a run cut short by a time
  limit still compares the two."""
  rows, peak, flops = [], args.gpu_peak_tflops * 1e3, {}

  def clip_flops():
    if "b16_clip" not in flops:
      flops["b16_clip"] = unrolled_flops(gpu_config("b16_clip", args.gpu_batch))
    return flops["b16_clip"]

  def ours(name):
    row = measure_jax(name, args.steps, peak, gpu_config(name, args.gpu_batch), args.profile,
                      pipeline=True)
    flops[name] = row["gflop_per_step"] * 1e9
    return row

  jobs = [(name, functools.partial(ours, name)) for name in args.gpu_cases.split(",")]
  for i, mode in enumerate(m for m in args.torch_modes.split(",") if m):
    torch_job = (f"Hugging Face CLIPModel, {mode}", lambda mode=mode: measure_torch(
        mode, args.steps, peak, clip_flops(), "b16", args.gpu_batch, pipeline=True))
    jobs.insert(min(2 * i + 1, len(jobs)), torch_job)
  for name, job in jobs:
    try:
      rows.append(job())
    except Exception as error:  # pylint: disable=broad-except  # one failed case keeps the others
      rows.append({"case": name, "error": f"{type(error).__name__}: {error}"[:2000]})
    print(json.dumps(rows[-1]), flush=True)
    save_rows(rows)
  return rows


def print_speed(rows: list, peak: float, label: str = "fp32 matmul peak of JAX here") -> None:
  print(f"{label}: {peak:.0f} GFLOP/s")
  print(" | ".join(("case", "implementation", "params M", "step s (median)", "ex/s",
                    "GFLOP/step", "share of matmul peak", "compile s")))
  for r in rows:
    if "error" in r:
      print(f"{r['case']} | error: {r['error'][:300]}")
      continue
    print(" | ".join(str(v) for v in (
        r["case"], r["implementation"], f"{r['params_millions']:.1f}", f"{r['step_s_median']:.3f}",
        f"{r['examples_per_s']:.1f}", f"{r['gflop_per_step']:.0f}",
        f"{100 * r['share_of_matmul_peak']:.0f}%", f"{r['compile_s']:.1f}")))


def print_memory(rows: list) -> None:
  print(" | ".join(("case", "mesh", "remat", "args MiB", "temp MiB", "total MiB per device")))
  for r in rows:
    if "error" in r:
      print(f"{r['case']} | error: {r['error']}")
      continue
    print(" | ".join(str(v) for v in (
        r["case"], r["mesh"], r["remat"], f"{r['arguments_mib']:.0f}",
        f"{r['temporaries_mib']:.0f}", f"{r['total_mib']:.0f}")))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="speed,torch,memory")
  parser.add_argument("--cases", default="ref_clip,ref_cliptex", help="speed part's cases")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--gpu_cases", default=",".join(GPU_CASES))
  parser.add_argument("--gpu_batch", type=int, default=256, help="global batch of part gpu")
  parser.add_argument("--gpu_peak_tflops", type=float, default=989.0,
                      help="the chip's dense bf16 peak, the denominator of MFU (part gpu)")
  parser.add_argument("--torch_modes", default="eager,torch.compile",
                      help="the PyTorch rows of part gpu (empty: none)")
  parser.add_argument("--profile", metavar="DIR",
                      help="also trace 3 steps of each of our rows into DIR/<case> and record "
                           "where their device time went (benchmarks/step_profile.py)")
  parser.add_argument("--big_vision", metavar="DIR",
                      help="a checkout of google-research/big_vision: adds part big_vision, its "
                           "two-tower step at the reference shape")
  parser.add_argument("--memory_child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.memory_child:
    print(json.dumps(memory_child(args.memory_child)))
    return
  parts = args.parts.split(",")
  if args.big_vision and "big_vision" not in parts:
    parts.append("big_vision")
  if "big_vision" in parts and not args.big_vision:
    parser.error("part big_vision needs --big_vision DIR (a checkout of google-research/big_vision)")
  peak = matmul_peak_gflops() if {"speed", "torch", "big_vision"} & set(parts) else None
  clip_flops = None
  if "speed" in parts:
    rows = [measure_jax(name, args.steps, peak, profile_dir=args.profile)
            for name in args.cases.split(",")]
    save("speed", rows, {"matmul_peak_gflops": peak})
    print_speed(rows, peak)
    clip_flops = next((r["gflop_per_step"] * 1e9 for r in rows if r["case"] == "ref_clip"), None)
  if "torch" in parts:
    clip_flops = clip_flops or unrolled_flops(reference_config([]))
    rows = [measure_torch(mode, args.steps, peak, clip_flops) for mode in ("eager", "torch.compile")]
    save("torch", rows, {"matmul_peak_gflops": peak})
    print_speed(rows, peak)
  if "big_vision" in parts:
    clip_flops = clip_flops or unrolled_flops(reference_config([]))
    rows = [measure_big_vision(args.big_vision, args.steps, peak, clip_flops)]
    save("big_vision", rows, {"matmul_peak_gflops": peak})
    print_speed(rows, peak)
  if "gpu" in parts:
    measured = matmul_peak_gflops(8192, dtype="bfloat16") / 1e3
    print(f"a bf16 8192^3 matmul measured here: {measured:.0f} TFLOP/s", flush=True)
    extra = {"peak_bf16_tflops_assumed": args.gpu_peak_tflops,
             "matmul_bf16_tflops_measured": measured, "steps": args.steps}
    rows = measure_gpu(args, lambda rows: save("gpu", rows, extra))
    print_speed(rows, args.gpu_peak_tflops * 1e3, "dense bf16 peak assumed for MFU")
    print(f"a bf16 8192^3 matmul measured here: {measured:.0f} TFLOP/s")
  if "memory" in parts:
    rows = [measure_memory(name) for name in MEMORY_CASES]
    save("memory", rows, {})
    print_memory(rows)


if __name__ == "__main__":
  main()
