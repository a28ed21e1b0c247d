"""metrics.jsonl holds one row per step, merged from everything logged at that step; a resumed
run replaces the rows of the steps it redoes; TensorBoard and the plots show what the file holds.
And the one "is it time?" schedule that logging, checkpoints and evaluators share."""

import os

import pytest

from clipzoo_jax import metrics, periodic, plots
from tests import helpers


def test_everything_of_a_step_lands_in_one_row(tmp_path):
  workdir = str(tmp_path)
  writer = metrics.MetricsWriter(workdir)
  writer.write(10, {"loss": 2.0, "learning_rate": 0.1})
  writer.write(10, {"eval/top1": 0.5})
  writer.flush()
  writer.write(20, {"loss": 1.0})
  writer.close()
  assert helpers.metrics_file_rows(workdir) == [
      {"step": 10, "loss": 2.0, "learning_rate": 0.1, "eval/top1": 0.5}, {"step": 20, "loss": 1.0}]
  helpers.assert_tensorboard_matches_file(workdir)

  # a standalone evaluator adds to step 10 later: merged into that row, not a second row
  later = metrics.MetricsWriter(workdir)
  later.write(10, {"eval/top5": 0.9})
  later.close()
  rows = helpers.metrics_file_rows(workdir)
  assert [r["step"] for r in rows] == [10, 20]
  assert rows[0]["eval/top5"] == 0.9 and rows[0]["loss"] == 2.0
  helpers.assert_tensorboard_matches_file(workdir)


def test_resume_replaces_the_rows_of_redone_steps(tmp_path):
  workdir = str(tmp_path)
  first = metrics.MetricsWriter(workdir)
  for step in range(1, 9):
    first.write(step, {"loss": float(step)})
    first.flush()
  # killed: no close; the checkpoint was at step 5, steps 6-8 will run again
  resumed = metrics.MetricsWriter(workdir, resume_step=5)
  for step in range(6, 11):
    resumed.write(step, {"loss": 100.0 + step})
    resumed.flush()
  resumed.close()
  rows = helpers.metrics_file_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, 11))
  assert [r["loss"] for r in rows] == [1, 2, 3, 4, 5, 106, 107, 108, 109, 110]
  helpers.assert_tensorboard_matches_file(workdir)
  steps, values = plots.loss_series(workdir)["loss"]
  assert steps == list(range(1, 11)) and values == [r["loss"] for r in rows]


def test_a_torn_last_line_is_dropped_and_other_damage_is_named(tmp_path):
  workdir = str(tmp_path)
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "loss": 3.0}\n{"step": 1, "grad_norm": 2.0}\n{"step": 2, "lo')
  assert metrics.read_rows(workdir) == [{"step": 1, "loss": 3.0, "grad_norm": 2.0}]
  writer = metrics.MetricsWriter(workdir, resume_step=1)
  writer.close()
  assert helpers.metrics_file_rows(workdir) == [{"step": 1, "loss": 3.0, "grad_norm": 2.0}]
  with open(path, "w") as f:
    f.write('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics row"):
    metrics.read_rows(workdir)


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
  writer = metrics.MetricsWriter(str(tmp_path))
  row = writer.write(3, {"loss": 1.5})
  writer.close()
  assert row == {"step": 3, "loss": 1.5}
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("every,moment,due", [
    (periodic.Every(10), periodic.Moment(20, 100), True),
    (periodic.Every(10), periodic.Moment(21, 100), False),
    (periodic.Every(10), periodic.Moment(95, 95), True),                      # last step
    (periodic.Every(10, at_last=False), periodic.Moment(95, 95), False),
    (periodic.Every(10), periodic.Moment(33, 100, stopping=True), True),      # preemption
    (periodic.Every(10, at_stop=False), periodic.Moment(33, 100, stopping=True), False),
    (periodic.Every(10, at_first=True), periodic.Moment(41, 100, first_step=41), True),
    (periodic.Every(10), periodic.Moment(41, 100, first_step=41), False),
    (periodic.Every(0), periodic.Moment(40, 100), False),                     # never by count
])
def test_every_is_due(every, moment, due):
  assert every.due(moment) is due


def test_every_counts_from_step_zero_not_from_a_restart():
  resumed = [s for s in range(23, 60) if periodic.Every(10).due(periodic.Moment(s, 100, 23))]
  assert resumed == [30, 40, 50]
  with pytest.raises(ValueError, match="steps must be >= 0"):
    periodic.Every(-1)
