"""Train a whole learning-rate x batch-size grid at once.

import sweep
cfg = sweep.SweepConfig(model=sweep.models.mlp(), data=sweep.data.digits(),
                        learning_rate=[1e-3, 1e-2], batch_size=[32, 128])
result = sweep.run(cfg)
result.table
"""

from sweep import (
  adapters,
  analysis,
  data,
  distributed,
  loggers,
  models,
  optuna,
  schedulers,
  space,
)
from sweep.batch_schedules import BatchSchedule, batch_ramp, batch_schedule
from sweep.checkpoints import restore_params, restore_variables
from sweep.config import SweepConfig
from sweep.engine import check, enable_compilation_cache, run, set_cpu_devices
from sweep.errors import ConfigError
from sweep.lr_find import LRFinderResult, lr_find
from sweep.results import Result

load = Result.load

__all__ = [
  'BatchSchedule',
  'ConfigError',
  'LRFinderResult',
  'Result',
  'SweepConfig',
  'adapters',
  'analysis',
  'batch_ramp',
  'batch_schedule',
  'check',
  'data',
  'distributed',
  'enable_compilation_cache',
  'load',
  'loggers',
  'lr_find',
  'models',
  'optuna',
  'restore_params',
  'restore_variables',
  'run',
  'schedulers',
  'set_cpu_devices',
  'space',
]
