"""The pseudo-labelling and visualize tools as a user types them: the README's commands in bash,
one-line user errors (a traceback only with --debug), every documented option settable."""

import glob
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from clipzoo_jax import cli
from clipzoo_jax.experts import base
from clipzoo_jax.pseudo_label import config as config_lib
from clipzoo_jax.pseudo_label import corpus as corpus_lib
from clipzoo_jax.pseudo_label import job
from tests.helpers import write_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "pseudo_label.py")


def _bash(command, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def _toyworld_tars(directory, num_tars=2):
  from clipzoo_jax.data import records, toyworld
  for t in range(num_tars):
    scene = toyworld.render_scene(0, t, 32)
    write_tar(os.path.join(directory, f"{t:05d}.tar"),
              [(scene.key + ".jpg", records.encode_jpeg(scene.image)),
               (scene.key + ".txt", scene.caption.encode())])


def test_unquoted_brace_pattern_is_refused_and_a_finished_rerun_loads_nothing(tmp_path):
  _toyworld_tars(str(tmp_path))
  out = tmp_path / "out"
  base_command = (f"{sys.executable} {TOOL} --config=configs/pseudo_label/toyworld.py:tasks=seg "
                  f"--output_dir={out} ")
  unquoted = _bash(base_command + f"--corpus=tar:{tmp_path}/{{00000..00001}}.tar")
  assert unquoted.returncode == 1 and "Traceback" not in unquoted.stderr
  assert "--corpus given 2 times" in unquoted.stderr and "quote it" in unquoted.stderr
  assert not out.exists()
  spaced = _bash(base_command + f"--corpus tar:{tmp_path}/{{00000..00001}}.tar")
  assert spaced.returncode == 1 and "unexpected arguments" in spaced.stderr
  quoted = base_command + f"--corpus='tar:{tmp_path}/{{00000..00001}}.tar'"
  first = _bash(quoted)
  assert first.returncode == 0, first.stderr[-2000:]
  assert len(glob.glob(str(out / "*.tfrecord"))) == 2
  rerun = _bash(quoted)
  assert rerun.returncode == 0 and "already complete (2 records in 2 shards)" in rerun.stdout
  assert "shards to do" not in rerun.stdout  # the job (and its experts) never started


@pytest.mark.parametrize("tool, args, message", [
    ("pseudo_label.py", "--config=configs/pseudo_label/toyworld.py --corpus=tar:/nonexistent/x.tar "
     "--output_dir=/tmp/unused", "error: corpus pattern '/nonexistent/x.tar': 1 of 1 tar files do not exist"),
    ("pseudo_label.py", "--config=configs/pseudo_label/zoo.py:depth=nope --output_dir=/tmp/unused",
     "zoo config arg depth='nope'"),
    ("pseudo_label.py", "--verify --output_dir=/nonexistent", "error: /nonexistent/manifest.json: no manifest"),
    ("visualize.py", "--dir=/nonexistent", "error: /nonexistent/manifest.json: no manifest"),
])
def test_user_errors_are_one_line_and_debug_shows_the_traceback(tool, args, message):
  command = f"{sys.executable} {os.path.join(REPO, 'tools', tool)} {args}"
  plain = _bash(command)
  assert plain.returncode == 1 and message in plain.stderr and "Traceback" not in plain.stderr
  debug = _bash(command + " --debug")
  assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_repeated_flags_and_leftover_arguments_are_user_errors():
  argv = ["tool", "--corpus=tar:/d/0.tar", "--corpus=tar:/d/1.tar", "--output_dir=o"]
  assert cli.repeated_flags(argv) == {"corpus": argv[1:3]}
  with pytest.raises(cli.UserError, match=r"--corpus given 2 times \(--corpus=tar:/d/0.tar \.\.\."):
    cli.check_arguments(argv, ["tool"], positional=False)
  with pytest.raises(cli.UserError, match=r"unexpected arguments \['/d/1.tar'\]"):
    cli.check_arguments(["tool", "--corpus", "/d/0.tar", "/d/1.tar"], ["tool", "/d/1.tar"], False)
  cli.check_arguments(["tool", "--corpus=a", "--", "--corpus=b"], ["tool"], positional=False)


def test_which_errors_are_user_errors():
  from clipzoo_jax.data import shards
  assert cli.is_user_error(corpus_lib.CorpusError("x")) and cli.is_user_error(job.JobError("x"))
  assert cli.is_user_error(base.ExpertError("x")) and cli.is_user_error(FileNotFoundError("x"))
  from clipzoo_jax.convert import tensor_files
  assert cli.is_user_error(shards.ManifestError("x"))
  assert cli.is_user_error(tensor_files.TensorFileError("x"))  # a subclass of ConversionError
  assert not cli.is_user_error(KeyError("x")) and not cli.is_user_error(ValueError("x"))


def test_documented_corpus_patterns_are_quoted():
  paths = [os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "tools", "*.py")) + \
      glob.glob(os.path.join(REPO, "configs", "pseudo_label", "*.py"))
  for path in paths:
    with open(path) as f:
      for line in f:
        for pattern in re.findall(r"--corpus=(\S+)", line):
          assert "{" not in pattern or pattern.startswith("'"), f"{path}: unquoted {line.strip()}"


def _parse(*args):
  """The tool's --config flag parsed from `args`, with its overrides."""
  values = flags.FlagValues()
  argv = ["tool", *args]
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def _load(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", "pseudo_label",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


_NOT_SETTABLE = {"task", "processor_kwargs", "depth", "from_task"}  # nested or Python-only


@pytest.mark.parametrize("name, arg", [("zoo", "normals=onnx,normals_onnx=/x.onnx"),
                                       ("zoo", "depth="), ("toyworld", "")])
def test_every_documented_option_has_a_default_in_the_config(name, arg):
  import importlib
  config = _load(name, arg)
  readers = {option for kind in ("tar", "csv", "tfds") for option in corpus_lib.reader_options(kind)}
  assert set(config.corpus) == readers | {"kind"}
  assert set(config.job) == set(job.JobOptions.__dataclass_fields__)
  for task, expert in config.experts.items():
    module = importlib.import_module(base._KIND_MODULES[expert.kind])
    cls = next(c for c in vars(module).values() if getattr(c, "kind", None) == expert.kind)
    options = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    if expert.kind in ("hf_detection", "hf_instance"):
      options |= set(inspect.signature(cls.__mro__[1].__init__).parameters) - {"self"}
    assert options - _NOT_SETTABLE <= set(expert), (task, sorted(options - set(expert)))


def test_open_clip_tsv_columns_and_label_cap_from_the_command_line(tmp_path):
  from clipzoo_jax.data import records
  import numpy as np
  (tmp_path / "a.jpg").write_bytes(records.encode_jpeg(np.zeros((8, 8, 3), np.uint8)))
  (tmp_path / "pairs.tsv").write_text("filepath\ttitle\na.jpg\ta black square\n")
  config = _parse("--config=configs/pseudo_label/toyworld.py:tasks=seg",
                  "--config.corpus.image_column=filepath", "--config.corpus.caption_column=title",
                  "--config.experts.seg.label_max_side=4", "--config.job.on_expert_error=skip")
  corpus = config_lib.make_corpus(config, f"tsv:{tmp_path / 'pairs.tsv'}")
  items = [item for part in corpus.plan() for item in corpus.read(part)]
  assert [(i.caption, len(i.image)) for i in items] == [("a black square", len((tmp_path / "a.jpg").read_bytes()))]
  experts = config_lib.make_experts(config)
  assert experts["seg"].label_size(np.zeros((30, 60, 3))) == (2, 4)
  assert config_lib.job_options(config).on_expert_error == "skip"
