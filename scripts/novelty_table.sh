#!/usr/bin/env bash
# The README's novelty table: every score on digits-7/3 and fmnist-7/3, with and without the
# evidential head, seeds 0 1 2. Two single-threaded lanes share the 2 cores; each job is
# `python -m components.seeds`. Then: python scripts/novelty_table.py runs/novelty
set -euo pipefail
cd "$(dirname "$0")/.."
run_one() {
  data=$1; head=$2; out=runs/novelty/$data-$head
  [ -f "$out/summary.json" ] && exit 0
  extra=(); [ "$head" = evidential ] && extra=(--gin gin/novelty/evidential.gin)
  OMP_NUM_THREADS=1 python -m components.seeds --gin "gin/novelty/$data.gin" "${extra[@]}" \
    --seeds 0 1 2 --out "$out" > "runs/logs/novelty-$data-$head.log" 2>&1
}
export -f run_one
mkdir -p runs/logs
printf '%s\n' "fmnist ce" "fmnist evidential" "digits ce" "digits evidential" |
  xargs -P "${LANES:-2}" -L 1 bash -c 'run_one $0 $1'
