"""Where a compiled train step spends its device time: a `jax.profiler` trace of a few steps,
its ops attributed to the step's parts through the compiled HLO's source names.

Each op that ran (a GPU kernel, or an XLA:CPU thunk) is looked up in the optimized HLO of the
step; the op names of its instructions (those of a fusion's body too) say which part it belongs
to and in which direction:

  part       `img`, `txt`, `heads` (the model's modules), `loss` and `optimizer` (named scopes of
             the train step), `other` (what none of these names: host-to-device glue, casts);
  direction  `forward` or `backward` (JAX names the backward pass `transpose(...)`);
  kind       matmul, attention (a fused attention call), convolution, reduction (layer norms,
             softmax, norms), elementwise, copy, collective.

  python benchmarks/step_profile.py TRACE_DIR HLO_FILE [--steps N]   # summarize a saved trace

`profile_step` does both halves for a compiled step (`Run.compile()`); `benchmarks/train_step.py
--profile DIR` calls it for each of its rows.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

PARTS = ("img", "txt", "heads", "loss", "optimizer")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\([^{]*)?\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def parse_hlo(text: str) -> tuple[dict, dict]:
  """(instructions: name -> its line, computations: name -> [its lines]) of an HLO module."""
  instructions, computations, current = {}, {}, None
  for line in text.splitlines():
    match = _COMPUTATION.match(line)
    if match and "=" not in line.split("{")[0]:
      current = computations.setdefault(match.group(1), [])
      continue
    match = _INSTRUCTION.match(line)
    if match:
      instructions[match.group(1)] = match.group(2)
      if current is not None:
        current.append(match.group(2))
  return instructions, computations


def _body(line: str, computations: dict, depth: int = 2) -> list[str]:
  """The line and the lines of the computations it calls (fusion bodies), `depth` levels down."""
  lines = [line]
  if depth:
    for called in _CALLS.findall(line):
      for inner in computations.get(called, ()):
        lines.extend(_body(inner, computations, depth - 1))
  return lines


def _votes(lines: list[str]) -> collections.Counter:
  votes = collections.Counter()
  for name in (name for line in lines for name in _OP_NAME.findall(line)):
    scopes = re.split(r"[/()]", name)
    part = next((p for p in PARTS if p in scopes), "other")
    votes[(part, "backward" if "transpose(" in name else "forward")] += 1
  return votes


def _operands(line: str) -> list[str]:
  match = re.search(r"\(([^)]*)\)", line.split(", metadata")[0].split("calls=")[0])
  return re.findall(r"%?([\w.\-]+)", match.group(1)) if match else []


def classify(line: str, computations: dict, instructions: dict | None = None
             ) -> tuple[str, str, str]:
  """(part, direction, kind) of one HLO instruction's line. An instruction that XLA left without
  source names (some weight-gradient convolutions) takes those of its operands' producers."""
  lines = _body(line, computations)
  text = "\n".join(lines)
  votes, frontier, inherited = _votes(lines), [line], False
  for _ in range(3):
    if votes or not instructions:
      break
    inherited = True
    frontier = [instructions[o] for f in frontier for o in _operands(f) if o in instructions]
    for producer in frontier:
      votes.update(_votes(_body(producer, computations)))
  part, direction = votes.most_common(1)[0][0] if votes else ("other", "forward")
  if inherited and any(d == "backward" for _, d in votes):  # it consumes a gradient
    direction = "backward"
  opcode = re.sub(r"^.*?\s([a-z][\w\-]*)\(.*$", r"\1", line.split(", metadata")[0])
  if "fmha" in text or "flash" in text.lower():
    kind = "attention"
  elif " dot(" in text or "gemm" in text or "matmul" in text:
    kind = "matmul"
  elif " convolution(" in text or "__cudnn$conv" in text:
    kind = "convolution"
  elif any(c in opcode for c in _COLLECTIVES):
    kind = "collective"
  elif " reduce(" in text or " reduce-window(" in text:
    kind = "reduction"
  elif opcode in ("copy", "transpose", "copy-start", "copy-done", "dynamic-update-slice") or (
      opcode == "fusion" and not re.search(r"\s(add|multiply|subtract|divide|exponential|"
                                           r"select|convert|maximum|minimum|rsqrt|tanh|"
                                           r"logistic|compare|negate)\(", text)):
    kind = "copy"
  else:
    kind = "elementwise"
  return part, direction, kind


def _trace_file(directory: str) -> str:
  found = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not found:
    raise FileNotFoundError(f"{directory}: no perfetto_trace.json.gz under it (a jax.profiler "
                            "trace made with create_perfetto_trace=True)")
  return found[-1]


def device_events(directory: str) -> tuple[list[dict], str]:
  """(the op events of the newest trace under `directory` in time order, what they are): on a
  GPU the kernels of its streams; on the CPU the XLA thunks of every thread (thread time:
  threads that overlap add up)."""
  with gzip.open(_trace_file(directory)) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  process_names, thread_names = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      process_names[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      thread_names[(e["pid"], e["tid"])] = e["args"]["name"]
  ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  device = [e for e in ops if "/device:" in process_names.get(e["pid"], "")]
  streams = [e for e in device if thread_names.get((e["pid"], e["tid"]), "").startswith("Stream")]
  chosen, what = (streams, "GPU stream kernels") if streams else (
      (device, "device ops") if device else (ops, "host thunks (thread time)"))
  return sorted(chosen, key=lambda e: float(e["ts"])), what


_LIBRARY_KINDS = (  # kernels of cuBLAS / cuDNN (not named after an HLO op), by name
    (re.compile(r"sdpa|flash|fmha|dot_do_o|convert_dq"), "attention"),
    (re.compile(r"fprop|dgrad|wgrad|conv|nhwc"), "convolution"),
    (re.compile(r"nvjet|gemm|cublas|cutlass|xmma|splitK"), "matmul"),
    (re.compile(r"(?i)memset|memcpy"), "copy"))
_BACKWARD_KERNEL = re.compile(r"bprop|dgrad|wgrad|dot_do_o|convert_dq")
MODEL_PARTS = ("img", "txt", "heads")


def _instruction_of(event: dict, instructions: dict) -> str | None:
  """The HLO instruction an event ran. A kernel inside a CUDA graph (XLA's command buffers)
  carries the command buffer as its op, but XLA names each kernel after its fusion
  (`loop_add_fusion_3` runs `loop_add_fusion.3`)."""
  name = event["name"]
  for candidate in (re.sub(r"_(\d+)$", r".\1", name), name, event["args"]["hlo_op"]):
    if candidate in instructions:
      return candidate
  return None


def summarize(directory: str, hlo_text: str, steps: int, top: int = 15) -> dict:
  """Milliseconds per step by part, direction and kind, and the costliest ops. A library
  kernel (cuBLAS, cuDNN) in a CUDA graph names no op: its kind comes from its name, its part
  and direction from the model op (img, txt, heads) that ran last before it on its stream (an
  approximation: right for a layer's products, which run among that layer's fusions)."""
  events, what = device_events(directory)
  instructions, computations = parse_hlo(hlo_text)
  by = {key: collections.Counter() for key in ("part", "direction", "kind", "part_kind")}
  per_op, launches = collections.Counter(), collections.Counter()
  unmatched, previous, cache = 0.0, ("other", "forward"), {}
  for e in events:
    ms = float(e["dur"]) / 1e3 / steps
    op = _instruction_of(e, instructions)
    if op is not None:
      if op not in cache:
        cache[op] = classify(instructions[op], computations, instructions)
      part, direction, kind = cache[op]
      if part in MODEL_PARTS:  # XLA interleaves the optimizer's fusions with the model's
        previous = (part, direction)
    else:
      kind = next((k for pattern, k in _LIBRARY_KINDS if pattern.search(e["name"])), None)
      if kind is None:
        unmatched += ms
        kind = "unknown"
      part, direction = previous
      if _BACKWARD_KERNEL.search(e["name"]):
        direction = "backward"
      op = re.sub(r"\d+", "N", e["name"])[:80]
    by["part"][part] += ms
    by["direction"][direction] += ms
    by["kind"][kind] += ms
    by["part_kind"][f"{part} {kind}"] += ms
    per_op[(op, part, direction, kind)] += ms
    launches[(op, part, direction, kind)] += 1
  rounded = lambda counter: {k: round(v, 3) for k, v in counter.most_common()}
  return {"counted": what, "steps": steps,
          "total_ms_per_step": round(sum(float(e["dur"]) for e in events) / 1e3 / steps, 3),
          "unmatched_ms_per_step": round(unmatched, 3),
          **{f"ms_per_step_by_{key}": rounded(counter) for key, counter in by.items()},
          "top_ops": [{"op": key[0], "ms_per_step": round(ms, 3), "part": key[1],
                       "direction": key[2], "kind": key[3],
                       "launches_per_step": launches[key] / steps}
                      for key, ms in per_op.most_common(top)]}


def profile_step(compiled, state, batch, directory: str, steps: int = 3):
  """Traces `steps` calls of the `compiled` train step (`Run.compile()`) into `directory`, with
  its optimized HLO (gzipped); returns (state, summary)."""
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  hlo = compiled.as_text()
  with gzip.open(os.path.join(directory, "train_step.hlo.txt.gz"), "wt") as f:
    f.write(hlo)
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
  return state, summarize(directory, hlo, steps)


def print_summary(summary: dict) -> None:
  print(f"{summary['counted']}: {summary['total_ms_per_step']:.1f} ms per step "
        f"({summary['unmatched_ms_per_step']:.1f} not found in the HLO)")
  for key in ("part", "direction", "kind", "part_kind"):
    values = summary[f"ms_per_step_by_{key}"]
    print(f"  by {key}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
  for op in summary["top_ops"]:
    print(f"  {op['ms_per_step']:8.2f} ms  {op['part']:9s} {op['direction']:8s} {op['kind']:11s}"
          f" x{op['launches_per_step']:g}  {op['op']}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace_dir")
  parser.add_argument("hlo", help="the step's optimized HLO text (.txt or .txt.gz)")
  parser.add_argument("--steps", type=int, default=3, help="steps the trace holds")
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args()
  opener = gzip.open if args.hlo.endswith(".gz") else open
  with opener(args.hlo, "rt") as f:
    hlo = f.read()
  summary = summarize(args.trace_dir, hlo, args.steps, args.top)
  print_summary(summary)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
