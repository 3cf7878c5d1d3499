#!/usr/bin/env bash
# Runs every experiment into workdirs/<name>, then writes each one's report.
#
#   bash scripts/reproduce.sh            # from the repository root, with sweep installed
#
# seed_mlp_mnist reads MNIST from $SWEEP_MNIST_DIR when it is set (see its docstring) and
# falls back to scikit-learn's digits otherwise. Each experiment's docstring gives its
# expected wall time and results; the first seven took 3 minutes on a 2-core CPU, char_lm
# and augment_digits (flax layers under the run axis) about 4 more each.
set -euo pipefail

cd "$(dirname "$0")/.."

EXPERIMENTS=(
  seed_mlp
  mnist1d_mlp
  mnist1d_cnn
  seed_mlp_mnist
  lr_batch_coupling
  lr_range_test
  overfitting
  char_lm
  augment_digits
  halving_digits
  increase_batch_size
)

declare -A SECONDS_TAKEN

for name in "${EXPERIMENTS[@]}"; do
  echo "=== ${name}"
  start=$(date +%s)
  if [[ "${name}" == lr_range_test ]]; then
    # Both range tests, the sweep and the comparison; the sweep lands in the workdir.
    python "experiments/${name}.py" --workdir "workdirs/${name}"
  else
    sweep run "experiments/${name}.py" --workdir "workdirs/${name}" --no-progress
  fi
  if [[ "${name}" == lr_batch_coupling ]]; then
    # The fitted slope of log(best lr) on log(batch size), read from the workdir.
    python "experiments/${name}.py" "workdirs/${name}"
  fi
  SECONDS_TAKEN[${name}]=$(( $(date +%s) - start ))
  echo "=== ${name}: ${SECONDS_TAKEN[${name}]} s"
done

if sweep report --help > /dev/null 2>&1; then
  for name in "${EXPERIMENTS[@]}"; do
    sweep report "workdirs/${name}"
  done
else
  echo "This version of sweep has no 'report' command; skipping the reports."
fi

echo
echo "Wall time per experiment:"
for name in "${EXPERIMENTS[@]}"; do
  printf '  %-20s %5d s\n' "${name}" "${SECONDS_TAKEN[${name}]}"
done
