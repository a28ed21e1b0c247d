"""The AOT fit check (clipzoo_jax/aot.py, tools/aot_compile.py): a small config fits and reports
its per-chip memory, a large batch on a small HBM fails with the levers, FLOPs of a scanned model
match an unscanned compile's, and (with libtpu installed) a v5e topology compiles on this CPU.

Without libtpu these tests compile for host CPU devices (`cpu:N`): they cover the sharding, the
memory arithmetic, the FLOPs count and the messages, not TPU memory; the v5e test is skipped.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from clipzoo_jax import aot
from clipzoo_jax import cli
from clipzoo_jax import run as run_lib
from tests import helpers


def _small_config(depth=2, **overrides):
  config = helpers.tiny_config(tasks=(), **overrides)
  config.model.image.depth = config.model.text.depth = depth
  config.mesh, config.mesh_allow_shrink = [1, -1, 1], False
  config.model.scan_layers = True
  return config


@pytest.fixture(scope="module")
def small_report():
  """(config, report) of a small config compiled once for 8 CPU devices (fsdp over all 8)."""
  config = _small_config(depth=1, global_batch_size=256)
  return config, aot.check(config, aot.parse_topology("cpu:8"), hbm_gib=1.0)


def test_small_config_fits_and_reports_per_chip_memory(small_report):
  config, report = small_report
  assert report.fits and report.num_devices == 8
  # fsdp over 8 devices: a chip holds its share of the fp32 params and both Adam moments (and
  # its batch shard), far less than the whole state
  params = sum(x.size for x in jax.tree.leaves(run_lib.abstract_params_and_specs(config.model)[0]))
  assert params * 4 * 3 / 8 <= report.arguments < params * 4 * 3 / 2
  assert report.aliased > 0 and report.temporaries > 0 and report.total < aot.GIB
  text = aot.format_report(report)
  assert "temporaries" in text and "of 1.00 GiB usable: fits" in text
  aot.raise_unless_fits(report, config)


def test_a_large_batch_on_a_small_hbm_fails_naming_total_limit_and_levers(small_report):
  config, report = small_report
  report = dataclasses.replace(report, hbm_limit_gib=0.001)  # 1 MiB chips
  assert not report.fits
  with pytest.raises(aot.DoesNotFit) as error:
    aot.raise_unless_fits(report, config)
  message = str(error.value)
  assert "does not fit on cpu:8" in message and "0.00 GiB usable" in message
  assert f"needs {report.total / aot.GIB:.2f} GiB" in message
  for lever in ("config.model.remat ('none'", "config.global_batch_size (256)",
                "gradient accumulation"):
    assert lever in message
  assert "config.mesh" not in message  # fsdp already spans every chip: not a lever here
  assert "\n" not in message
  data_parallel = config.copy_and_resolve_references()
  data_parallel.mesh, data_parallel.model.remat = [-1, 1, 1], "full"
  assert "config.mesh [-1, 1, 1]" in aot.levers(data_parallel)
  assert "config.model.remat" not in aot.levers(data_parallel)


def test_scanned_flops_equal_an_unscanned_compile():
  """The reported FLOPs of a scanned model against an unscanned compile of it. The count comes
  from the unoptimised program: at width 64 (elementwise ops a large share) up to ~6% below the
  optimised one; at real widths matmuls dominate. The scanned compile's own count misses layers
  (asserted in the v5e test, where the scanned compile is made anyway)."""
  config = _small_config(depth=2, global_batch_size=8)
  config.mesh = [1, 1, 1]
  assert config.model.scan_layers
  unscanned_config = config.copy_and_resolve_references()
  unscanned_config.model.scan_layers = False
  unscanned = run_lib.setup(unscanned_config, jax.devices()[:1]).compile().cost_analysis()
  assert aot.step_flops(config) == pytest.approx(unscanned["flops"], rel=0.08)


def test_topology_errors_are_one_line_user_errors(monkeypatch):
  with pytest.raises(cli.UserError, match="unknown TPU generation 'v9'"):
    aot.parse_topology("v9:2x2")
  with pytest.raises(cli.UserError, match="GENERATION:SHAPE"):
    aot.parse_topology("v5e-256")
  assert aot.parse_topology("v5e:16x16").num_chips == 256
  with pytest.raises(cli.UserError, match="only 8 CPU devices"):
    aot.topology_devices(aot.parse_topology("cpu:16"))
  monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
  with pytest.raises(cli.UserError, match=r"pip install -r requirements-tpu.txt"):
    aot.topology_devices(aot.parse_topology("v5e:2x2"))


def test_the_tool_ends_a_bad_topology_with_one_line():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, os.path.join(root, "tools", "aot_compile.py"),
                           "--config=configs/demo.py", "--topology=v9:2x2"], cwd=root,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1
  assert result.stderr.startswith("error: --topology 'v9:2x2': unknown TPU generation 'v9'")


@pytest.mark.skipif(not aot.libtpu_installed(), reason="libtpu not installed "
                    "(pip install -r requirements-tpu.txt)")
def test_v5e_topology_compiles_on_this_cpu_with_libtpu():
  config = _small_config(depth=6, global_batch_size=16)
  report = aot.check(config, aot.parse_topology("v5e:2x2"))
  assert report.num_devices == 4 and report.hbm_limit_gib == aot.CHIPS["v5e"].usable_gib
  assert report.fits and 0 < report.total < aot.GIB
  # the TPU compile's own count has each tower's scanned body once: 5 of 6 layers missing
  assert report.compiled_flops_per_chip * 4 < 0.5 * report.flops_per_step


def test_the_memory_benchmark_table_prints_every_saved_row():
  """`python benchmarks/aot_memory.py --table`, as the README gives it: the recorded rows again,
  each with its total (or its refusal) and the code it measured, without compiling anything."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "benchmarks/aot_memory.py", "--table"], cwd=root,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  import json
  with open(os.path.join(root, "benchmarks", "results", "aot_memory.json")) as f:
    rows = json.load(f)["rows"]
  lines = result.stdout.splitlines()
  assert lines[0].split(" | ")[-1] == "code"
  for row in rows:
    printed = next(line for line in lines if line.startswith(row["case"] + " | "))
    expected = "-" if row.get("total_gib") is None else f"{row['total_gib']:.2f}"
    assert printed.split(" | ")[5] == expected, printed
    assert printed.split(" | ")[-1] == (row.get("code") or "-"), printed
