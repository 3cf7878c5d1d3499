"""Result files verified like checkpoints: no reader shows a damaged table.

One tiny real sweep writes a workdir (results.csv, curves.csv, config.json, their
checksums.json, and a whole copy in state/results/). Each file is then damaged in a copy
of that workdir (cut to half, deleted, or one byte changed) and read by each reader
(`sweep.load`, `sweep report`): with the copy whole, the reader gives back the sweep as
written and rebuilds the file, saying so in one line; with the copy damaged too, it
refuses in one line naming the file and the command that rebuilds it, and `sweep run`
on the workdir then rebuilds the results from its checkpoints, training nothing.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import sweep
from kernels import train
from sweep import cli, files, lock, report, results

FILES = ('results.csv', 'curves.csv', 'config.json', 'checksums.json')
NUM_RUNS = 6

EXPERIMENT = textwrap.dedent("""
  import numpy as np
  import sweep


  def get_config():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = np.argmax(x[:, :3], axis=1).astype(np.int32)
    return sweep.SweepConfig(
        model=sweep.models.mlp(hidden=(8,)),
        data=sweep.data.arrays(x[:96], y[:96], x[96:], y[96:]),
        learning_rate=[0.003, 0.01, 0.03],
        batch_size=[16],
        seed=[0, 1],
        epochs=2,
        num_evals=2,
    )
""")


@pytest.fixture(scope='module')
def finished(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp('finished')
  experiment = root / 'experiment.py'
  experiment.write_text(EXPERIMENT)
  workdir = root / 'w'
  sweep.run(
    cli.load_experiment(str(experiment)),
    str(workdir),
    progress=False,
    experiment_file=str(experiment),
  )
  return workdir


def damaged_copy(finished: Path, tmp_path: Path, name: str, how: str, copy_too=False) -> Path:
  workdir = tmp_path / 'w'
  shutil.copytree(finished, workdir)
  targets = [workdir / name]
  if copy_too:
    targets.append(Path(results.copy_path(str(workdir))) / name)
  for path in targets:
    if how == 'cut':
      os.truncate(path, path.stat().st_size // 2)
    elif how == 'deleted':
      path.unlink()
    else:  # one byte changed, the size kept
      data = bytearray(path.read_bytes())
      data[len(data) // 2] ^= 0x01
      path.write_bytes(bytes(data))
  return workdir


def assert_as_written(result: sweep.Result, finished: Path) -> None:
  written = sweep.load(str(finished))
  assert len(result.table) == NUM_RUNS
  pd.testing.assert_frame_equal(result.table, written.table, check_exact=True)
  pd.testing.assert_frame_equal(result.curves, written.curves, check_exact=True)
  assert result.config == written.config


def assert_whole_again(workdir: Path, finished: Path) -> None:
  for name in FILES:
    assert (workdir / name).read_bytes() == (finished / name).read_bytes(), name


def test_a_finished_workdir_reads_back_without_a_word(finished, capsys):
  result = sweep.load(str(finished))
  assert len(result.table) == NUM_RUNS and capsys.readouterr().err == ''
  assert files.read_checked(str(finished), FILES[:3])[1] is None
  assert files.read_checked(results.copy_path(str(finished)), FILES[:3])[1] is None


@pytest.mark.parametrize('how', ['cut', 'deleted', 'edited'])
@pytest.mark.parametrize('name', FILES)
def test_load_rebuilds_a_damaged_file_from_the_whole_copy(finished, tmp_path, capsys, name, how):
  workdir = damaged_copy(finished, tmp_path, name, how)
  assert_as_written(sweep.load(str(workdir)), finished)
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'sweep: {workdir / name} ' in err and 'rebuilt' in err, err
  assert_whole_again(workdir, finished)
  sweep.load(str(workdir))
  assert capsys.readouterr().err == ''  # whole again: nothing more to say


@pytest.mark.parametrize('name', FILES)
def test_report_rebuilds_a_damaged_file_and_reports_every_run(finished, tmp_path, capsys, name):
  workdir = damaged_copy(finished, tmp_path, name, 'cut')
  assert cli.main(['report', str(workdir)]) == 0
  out, err = capsys.readouterr()
  assert out.strip() == str(workdir / 'report' / 'report.html')
  assert err.count('\n') == 1 and 'rebuilt' in err, err
  page = (workdir / 'report' / 'report.html').read_text()
  assert f'{NUM_RUNS} runs' in page and 'left no learning curves' not in page
  assert_whole_again(workdir, finished)


@pytest.mark.parametrize('name', FILES)
def test_a_damaged_file_without_a_whole_copy_is_refused_in_one_line(
  finished, tmp_path, capsys, name
):
  workdir = damaged_copy(finished, tmp_path, name, 'cut', copy_too=True)
  way_out = f'sweep run {workdir / "experiment.py"} --workdir {workdir}'
  with pytest.raises(files.DamagedFile) as e:
    sweep.load(str(workdir))
  message = str(e.value)
  assert message.startswith(f'{workdir / name} is ') and way_out in message, message
  assert cli.main(['report', str(workdir)]) == 1
  err = capsys.readouterr().err
  assert err == f'sweep: {message}\n'
  assert not (workdir / 'report').exists()


def test_the_rerun_rebuilds_damaged_results_from_the_checkpoints(finished, tmp_path, monkeypatch):
  segments = []
  monkeypatch.setattr(train, 'segment_jit', lambda *a, **k: segments.append(1))
  workdir = damaged_copy(finished, tmp_path, 'results.csv', 'cut', copy_too=True)
  (workdir / 'curves.csv').unlink()
  experiment = str(workdir / 'experiment.py')
  # As `sweep run` does: every unit is finished, nothing trains.
  sweep.run(
    cli.load_experiment(experiment), str(workdir), progress=False, experiment_file=experiment
  )
  assert segments == []
  assert_whole_again(workdir, finished)
  assert_as_written(sweep.load(str(workdir)), finished)


def test_a_reader_does_not_rebuild_while_a_writer_holds_the_workdir(finished, tmp_path, capsys):
  workdir = damaged_copy(finished, tmp_path, 'curves.csv', 'cut')
  with lock.WorkdirLock(str(workdir)):
    assert_as_written(sweep.load(str(workdir)), finished)  # from the whole copy
  err = capsys.readouterr().err
  assert 'not rebuilt while pid' in err and err.count('\n') == 1, err
  assert (workdir / 'curves.csv').stat().st_size < (finished / 'curves.csv').stat().st_size


def test_a_workdir_without_results_is_no_finished_sweep(tmp_path, capsys):
  with pytest.raises(FileNotFoundError, match='holds no finished sweep'):
    sweep.load(str(tmp_path))
  assert cli.main(['report', str(tmp_path / 'nothing')]) == 2
  assert 'holds no finished sweep' in capsys.readouterr().err
  with pytest.raises(FileNotFoundError):
    report.write_report(str(tmp_path))
