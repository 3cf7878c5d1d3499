#!/usr/bin/env bash
# Launch one sweep on every worker of a cloud TPU VM slice.
#
#   scripts/tpu_sweep.sh TPU_NAME ZONE EXPERIMENT.py WORKDIR [extra `sweep run` flags]
#
# Every worker runs the same command; `--distributed` makes each call
# jax.distributed.initialize(), which finds the coordinator and the process ids by itself
# on TPU VMs. Each process trains its own share of the run axis; process 0 writes the
# results and the saved runs to WORKDIR (use a path every worker can reach, e.g. a
# mounted bucket, or read it from worker 0). The repository must be at the same path on
# every worker (copy it first, e.g. `gcloud compute tpus tpu-vm scp --recurse --worker=all`).
set -euo pipefail
if [ "$#" -lt 4 ]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
name=$1 zone=$2 experiment=$3 workdir=$4
shift 4
repo=${SWEEP_REPO:-'~/sweep'}
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  cd $repo
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  sweep run $experiment --workdir $workdir --distributed --no-progress $*
"
