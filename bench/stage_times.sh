#!/usr/bin/env bash
# Wall time of each pipeline stage on this machine: forces every stage to rerun, one at a time.
# Usage (from the project root, after `make install`): bash bench/stage_times.sh
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$(mktemp -d)/mlflow.db}"
total=0
for stage in sample_data base validate dapt sft evaluate register; do
  start=$(date +%s.%N)
  dvc repro --force --single-item "$stage" > /dev/null 2>&1 || { echo "stage $stage failed"; exit 1; }
  end=$(date +%s.%N)
  secs=$(python -c "print(f'{$end - $start:.1f}')")
  total=$(python -c "print(f'{$total + $secs:.1f}')")
  printf '%-12s %6s s\n' "$stage" "$secs"
done
printf '%-12s %6s s\n' total "$total"
