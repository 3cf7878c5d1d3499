"""`sweep run --set FIELD=VALUE` and `sweep run --dry-run`.

The parser alone (table-driven); then the command in this process (`sweep.cli.main`): a
mistake in `--set` is one line naming the field and its close matches, the overridden
values reach config.json and the fingerprint, and a dry run prints the plan, writes nothing
and estimates the wall time within a stated factor of the real run.
"""

from __future__ import annotations

import json
import re
import textwrap

import jax
import pytest

import sweep
from sweep import cli, dryrun, overrides

EXPERIMENT = textwrap.dedent("""
  import sweep


  def get_config():
    return sweep.SweepConfig(
        model=sweep.models.mlp(hidden=(16,)),
        data=sweep.data.digits(),
        optimizer='sgd',
        learning_rate=[0.03, 0.3],
        batch_size=[64, 256],
        epochs=2,
        name='overridden',
    )
""")

# The dry run's estimate against the real run: the cost model was fitted on a 2-core CPU
# whose load (other jobs) moves real times by 2-3x, so the band is wide.
FACTOR = 4.0


@pytest.mark.parametrize(
  'items, expected',
  [
    (['epochs=2'], {'epochs': 2}),
    (['learning_rate=[1e-3, 1e-2]'], {'learning_rate': [1e-3, 1e-2]}),
    (['optimizer=adamw'], {'optimizer': 'adamw'}),
    (["optimizer='adamw'"], {'optimizer': 'adamw'}),
    (['batch_size=(16,32)', 'seed=[0, 1]'], {'batch_size': (16, 32), 'seed': [0, 1]}),
    (['momentum=None'], {'momentum': None}),
    (['noise_scale=True'], {'noise_scale': True}),
    (["objectives={'final_val_loss': 'min'}"], {'objectives': {'final_val_loss': 'min'}}),
    (['name=a=b'], {'name': 'a=b'}),
  ],
)
def test_values_are_python_literals_and_other_text_is_a_string(items, expected):
  assert overrides.parse(items) == expected


@pytest.mark.parametrize(
  'text, expected',
  [
    (
      '[32, batch_ramp(32, factor=5, at=(1/3, 2/3))]',
      [32, sweep.batch_ramp(32, factor=5, at=(1 / 3, 2 / 3))],
    ),
    ('sweep.batch_schedule([(0, 16), (0.5, 64)])', sweep.batch_schedule([(0, 16), (0.5, 64)])),
    ('loguniform(1e-4, 1e-1)', sweep.space.loguniform(1e-4, 1e-1)),
    ('space.choice([32, 64])', sweep.space.choice([32, 64])),
    ('sweep.space.randint(1, 2**4)', sweep.space.randint(1, 16)),
    # Anything else stays text, never evaluated.
    ('__import__("os").getcwd()', '__import__("os").getcwd()'),
    ('open("x")', 'open("x")'),
    ('os.batch_ramp(32)', 'os.batch_ramp(32)'),
    ('batch_ramp(32).__class__', 'batch_ramp(32).__class__'),
    ('batch_ramp(x)', 'batch_ramp(x)'),
  ],
)
def test_values_may_call_the_librarys_value_constructors_and_nothing_else(text, expected):
  got = overrides.literal(text)
  assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
  'items, fragments',
  [
    (['lerning_rate=0.1'], ["no field 'lerning_rate'", "did you mean 'learning_rate'"]),
    (['batchsize=8'], ["no field 'batchsize'", "'batch_size'"]),
    (['epochs'], ["--set 'epochs' is invalid", 'FIELD=VALUE']),
    (['=3'], ['FIELD=VALUE']),
    (['model=mlp'], ['model holds a Python object', 'experiment file']),
    (['epochs=1', 'epochs=2'], ['--set epochs is given twice']),
  ],
)
def test_a_wrong_override_names_the_field_and_what_is_accepted(items, fragments):
  with pytest.raises(sweep.ConfigError) as e:
    overrides.parse(items)
  for fragment in fragments:
    assert fragment in str(e.value)


def main(argv, monkeypatch, capsys) -> tuple[int, str, str]:
  monkeypatch.setenv('SWEEP_NO_CACHE', '1')
  jax.local_devices()  # JAX is up: the command keeps this process's devices as they are
  code = cli.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.fixture
def experiment(tmp_path):
  path = tmp_path / 'experiment.py'
  path.write_text(EXPERIMENT)
  return path


def test_an_unknown_field_is_one_line_and_nothing_is_written(
  experiment, tmp_path, monkeypatch, capsys
):
  workdir = tmp_path / 'out'
  code, _, err = main(
    ['run', str(experiment), '--workdir', str(workdir), '--set', 'epoch=3'], monkeypatch, capsys
  )
  assert code == 2
  assert err.count('\n') == 1 and 'Traceback' not in err, err
  assert "no field 'epoch'" in err and "'epochs'" in err, err
  assert not workdir.exists()


def test_an_invalid_value_is_refused_naming_the_override(experiment, tmp_path, monkeypatch, capsys):
  code, _, err = main(
    ['run', str(experiment), '--workdir', str(tmp_path / 'out'), '--set', 'learning_rate=-1'],
    monkeypatch,
    capsys,
  )
  assert code == 2
  assert '--set learning_rate=-1' in err and 'learning_rate=-1' in err, err


def test_a_dry_run_prints_the_plan_and_writes_nothing(experiment, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / 'out'
  before = sorted(p.name for p in tmp_path.iterdir())
  code, out, err = main(
    ['run', str(experiment), '--workdir', str(workdir), '--dry-run', '--set', 'seed=[0, 1]'],
    monkeypatch,
    capsys,
  )
  assert code == 0, err
  assert sorted(p.name for p in tmp_path.iterdir()) == before
  assert "Dry run of 'overridden': 8 runs" in out
  assert re.search(r'^Compile groups: 1; units of work: 1$', out, re.M), out
  assert re.search(r'batch 64: 44 updates, 2x\d+ slots', out), out
  assert re.search(r'^Memory: about [\d.]+ [KMG]iB per device', out, re.M), out
  assert re.search(r'^Time: about \d+ s', out, re.M), out


def test_overrides_reach_config_json_and_the_fingerprint_and_the_estimate_is_near(
  experiment, tmp_path, monkeypatch, capsys
):
  workdir = tmp_path / 'out'
  cfg = overrides.apply(cli.load_experiment(str(experiment)), {'epochs': 3, 'seed': [0, 1]})
  estimate, _, _ = dryrun.estimate(cfg)
  argv = ['run', str(experiment), '--workdir', str(workdir), '--no-progress', '--no-report']
  # The estimate is a first call's: nothing compiled or timed by an earlier test counts.
  jax.clear_caches()
  sweep.timing._MEASURED.clear()
  code, out, err = main(argv + ['--set', 'epochs=3', '--set', 'seed=[0, 1]'], monkeypatch, capsys)
  assert code == 0, err
  config = json.loads((workdir / 'config.json').read_text())
  assert config['epochs'] == 3 and config['axes']['seed'] == [0, 1]
  assert config['num_runs'] == 8

  real = float(re.search(r'8 runs in ([\d.]+) s', out).group(1))
  assert real / FACTOR <= estimate.seconds <= real * FACTOR, (estimate, real)

  # The same workdir without the overrides is another sweep: refused, naming what differs.
  code, _, err = main(argv, monkeypatch, capsys)
  assert code == 2 and 'epochs' in err, err
