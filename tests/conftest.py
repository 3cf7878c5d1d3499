"""Settings shared by the test files."""

import os

# Timing each batch group alone (sweep.timing) compiles a small program per batch size before
# a sweep trains: seconds that each of the suite's few-second sweeps would pay. The tests of
# the timing ask for it (sweep.run(..., time_runs=True)); subprocesses inherit the setting.
os.environ.setdefault('SWEEP_NO_RUN_TIMING', '1')
