"""Ahead-of-time fit check: compile a config's real train step for a TPU topology on this machine,
before a pod is rented, and read its per-chip memory and FLOPs per step.

libtpu (an optional install, `pip install -r requirements-tpu.txt`) makes compile-only devices of
any topology (`v5e:16x16`, `v4:4x4x4`) with no TPU attached; `run.setup(config, devices=...)` then
builds exactly the mesh, state and batch the pod would, and the compiler's memory analysis is the
pod's. `cpu:N` compiles for N host CPU devices instead (no libtpu; XLA_FLAGS must force N devices),
which checks the sharding and the FLOPs but not TPU memory.

FLOPs: `cost_analysis()` of a compiled step counts a scanned layer body once, whatever the depth.
The step is therefore lowered a second time with the layers unrolled (model.scan_layers=False, on
one CPU device) and XLA's cost analysis of that lowered (traced, not compiled) program is the
count: every layer of both towers, the heads, the loss, the backward pass and any remat
recomputation, summed over all chips. Lowering is tracing only: seconds, where an unrolled compile
would take minutes. It counts the unoptimised program: on a width-64 test model, where elementwise
ops are a large share, up to ~6% below an unrolled compile's count (tests/test_aot_compile.py);
matmuls dominate at real widths. The scanned compile's own count is reported beside it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax
import ml_collections

from clipzoo_jax import cli
from clipzoo_jax import run as run_lib

GIB = 2 ** 30
REQUIREMENTS_TPU = "requirements-tpu.txt"


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float     # nominal HBM of one chip
  usable_gib: float  # what the compiler lets one program use ("available HBM" of libtpu 0.0.42)
  megacore: bool     # two TensorCores that JAX sees as one device (v4, v5p)


CHIPS = {
    "v4": Chip(hbm_gib=32, usable_gib=30.75, megacore=True),
    "v5e": Chip(hbm_gib=16, usable_gib=15.75, megacore=False),
    "v5p": Chip(hbm_gib=95, usable_gib=95.74, megacore=True),
    "v6e": Chip(hbm_gib=32, usable_gib=31.25, megacore=False),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """`v5e:16x16` (a TPU generation and its chip grid) or `cpu:8` (host CPU devices)."""
  name: str
  platform: str       # "tpu" or "cpu"
  num_chips: int
  chip: Chip | None   # None on cpu: no HBM figure unless one is given

  @property
  def generation(self) -> str:
    return self.name.partition(":")[0]


def parse_topology(text: str) -> Topology:
  match = re.fullmatch(r"(\w+):(\d+(?:x\d+)*)", text.strip())
  if not match:
    raise cli.UserError(f"--topology {text!r}: expected GENERATION:SHAPE such as v5e:16x16, "
                        "v4:4x4x4 or cpu:8")
  generation, shape = match.groups()
  num_chips = 1
  for size in shape.split("x"):
    num_chips *= int(size)
  if generation == "cpu":
    return Topology(text, "cpu", num_chips, None)
  if generation not in CHIPS:
    raise cli.UserError(f"--topology {text!r}: unknown TPU generation {generation!r}; known: "
                        f"{sorted(CHIPS)} and cpu")
  return Topology(text, "tpu", num_chips, CHIPS[generation])


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology) -> list:
  """Compile-only devices of a TPU topology, or the first N host CPU devices."""
  if topology.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < topology.num_chips:
      raise cli.UserError(
          f"--topology {topology.name}: only {len(devices)} CPU devices; set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={topology.num_chips} before running")
    return devices[:topology.num_chips]
  if not libtpu_installed():
    raise cli.UserError(f"--topology {topology.name} needs libtpu to compile for TPU (no TPU "
                        f"needed): pip install -r {REQUIREMENTS_TPU}; or use --topology cpu:N")
  # Compile-only devices touch no TPU: let other processes (a second check, a benchmark) load
  # libtpu too, instead of failing on its single-process lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {"chip_config_name": "megacore"} if topology.chip.megacore else {}
  try:
    return list(topologies.get_topology_desc(topology.name, "tpu", **kwargs).devices)
  except Exception as error:  # noqa: BLE001  (libtpu refuses an impossible chip grid)
    raise cli.UserError(f"--topology {topology.name}: libtpu cannot make this topology: "
                        f"{str(error).splitlines()[0]}") from None


@dataclasses.dataclass
class Report:
  """Per-chip memory of the compiled step (bytes), its global FLOPs and the chip's HBM."""
  topology: Topology
  num_devices: int
  arguments: int
  outputs: int
  aliased: int          # outputs that reuse argument buffers (the donated state)
  temporaries: int
  generated_code: int
  flops_per_step: float  # global, all chips, layers unrolled
  compiled_flops_per_chip: float  # cost_analysis() of the scanned compile (scan body once)
  hbm_limit_gib: float | None     # usable HBM to fit into; None: unknown (cpu without --hbm_gib)

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @property
  def fits(self) -> bool:
    return self.hbm_limit_gib is None or self.total <= self.hbm_limit_gib * GIB

  def to_json(self) -> dict:
    fields = ("arguments", "outputs", "aliased", "temporaries", "generated_code", "total")
    return {"topology": self.topology.name, "num_devices": self.num_devices,
            **{f"{name}_gib": getattr(self, name) / GIB for name in fields},
            "hbm_limit_gib": self.hbm_limit_gib, "fits": self.fits,
            "flops_per_step": self.flops_per_step,
            "flops_per_chip": self.flops_per_step / self.num_devices,
            "compiled_flops_per_chip_scan_body_once": self.compiled_flops_per_chip}


def format_report(report: Report) -> str:
  gib = lambda value: (f"{value / GIB:8.2f} GiB" if value >= GIB / 10
                       else f"{value / 2 ** 20:8.1f} MiB")
  limit = ("unknown (cpu; pass --hbm_gib)" if report.hbm_limit_gib is None
           else f"{report.hbm_limit_gib:.2f} GiB usable")
  lines = [f"per-chip memory of the train step on {report.topology.name} "
           f"({report.num_devices} devices):",
           f"  arguments       {gib(report.arguments)}",
           f"  outputs         {gib(report.outputs)}  ({gib(report.aliased).strip()} aliased "
           "to donated arguments)",
           f"  temporaries     {gib(report.temporaries)}",
           f"  generated code  {gib(report.generated_code)}",
           f"  total           {gib(report.total)}  of {limit}: "
           f"{'fits' if report.fits else 'DOES NOT FIT'}",
           f"FLOPs per step: {report.flops_per_step:.4g} "
           f"({report.flops_per_step / report.num_devices:.4g} per chip; layers unrolled, "
           "backward and remat recomputation included)"]
  return "\n".join(lines)


class DoesNotFit(cli.UserError):
  """The step needs more memory per chip than the chip has."""


def levers(config: ml_collections.ConfigDict) -> str:
  """The config keys that trade memory, those already at their limit left out."""
  found = []
  if config.model.remat != "full":
    found.append(f"config.model.remat ('{config.model.remat}'; 'full' saves the most)")
  data, fsdp, _ = config.mesh
  if not (data == 1 and fsdp == -1):
    found.append(f"a larger fsdp mesh size (config.mesh {list(config.mesh)}; [1,-1,1] shards "
                 "the state over every chip)")
  steps = int(config.get("grad_accum_steps", 1))
  found.append(f"gradient accumulation (config.grad_accum_steps {steps}: activations of one "
               "micro-batch at a time, same gradient)")
  if not config.loss.get("contrastive_chunk"):
    found.append("config.loss.contrastive_chunk (the contrastive logits a chunk of rows at a "
                 "time)")
  found.append(f"a smaller config.global_batch_size ({config.global_batch_size})")
  return "levers: " + ", ".join(found)


def does_not_fit(config, topology: Topology, needed: str, limit_gib: float | None) -> DoesNotFit:
  limit = f"{limit_gib:.2f} GiB usable" if limit_gib is not None else "the chip's HBM"
  return DoesNotFit(f"does not fit on {topology.name}: needs {needed} per chip, a chip has "
                    f"{limit}; {levers(config)}")


def compile_step(run: run_lib.Run, config, topology: Topology, limit_gib: float | None):
  """The compiled step, or DoesNotFit when the TPU compiler runs out of HBM (its own message
  names the temporaries and the available HBM)."""
  try:
    return run.compile()
  except jax.errors.JaxRuntimeError as error:
    message = str(error)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    found = re.search(r"required for (.+?) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
                      message)
    if not found:
      raise does_not_fit(config, topology, message.splitlines()[0], limit_gib) from None
    what, needed, available = found.groups()
    raise does_not_fit(config, topology, f"{needed} GiB for {what}", float(available)) from None


def step_flops(config: ml_collections.ConfigDict) -> float:
  """Global FLOPs of one train step: the step lowered with the layers unrolled (module docstring).

  Lowered on one host CPU device (libtpu's compile-only client has no cost analysis of a lowered
  program): the unpartitioned program, and so its count, is the same on any mesh."""
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers = False
  unrolled.grad_accum_unroll = True  # every micro-batch counted, not one loop body
  unrolled.mesh, unrolled.mesh_allow_shrink = [1, 1, 1], False
  run = run_lib.setup(unrolled, jax.devices("cpu")[:1])
  lowered = run.train_step.lower(run.abstract_state, run.abstract_batch)
  return float(lowered.cost_analysis()["flops"])


def check(config: ml_collections.ConfigDict, topology: Topology,
          hbm_gib: float | None = None) -> Report:
  """Compiles the train step of `config` for `topology` and reports its per-chip memory and FLOPs
  (`hbm_gib` replaces the chip's usable HBM). Raises DoesNotFit when the compiler refuses."""
  limit_gib = hbm_gib if hbm_gib is not None else (topology.chip.usable_gib if topology.chip
                                                   else None)
  devices = topology_devices(topology)
  run = run_lib.setup(config, devices)
  compiled = compile_step(run, config, topology, limit_gib)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  return Report(topology=topology, num_devices=len(devices),
                arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
                generated_code=memory.generated_code_size_in_bytes,
                flops_per_step=step_flops(config),
                compiled_flops_per_chip=float(cost.get("flops", 0.0)), hbm_limit_gib=limit_gib)


def raise_unless_fits(report: Report, config: ml_collections.ConfigDict) -> None:
  if not report.fits:
    raise does_not_fit(config, report.topology, f"{report.total / GIB:.2f} GiB (arguments "
                       f"{report.arguments / GIB:.2f}, temporaries {report.temporaries / GIB:.2f})",
                       report.hbm_limit_gib)
