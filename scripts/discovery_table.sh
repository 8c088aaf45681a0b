#!/usr/bin/env bash
# The README's discovery table: supervised-only against contrastive features, digits-7/3 and
# fmnist-7/3, seeds 0 1 2. Two single-threaded lanes share the 2 cores; each job is
# `python -m components.seeds`. "supervised_wide" is gin/discovery/fmnist_wide.gin (a 32-wide
# backbone trained 30 epochs). Then: python scripts/discovery_table.py runs/discovery
set -euo pipefail
cd "$(dirname "$0")/.."
run_one() {
  data=$1; features=$2; out=runs/discovery/$data-$features
  [ -f "$out/summary.json" ] && exit 0
  files=(--gin "gin/discovery/$data.gin")
  [ "$features" = contrastive ] && files+=(--gin gin/discovery/contrastive.gin)
  [ "$features" = supervised_wide ] && files=(--gin gin/discovery/fmnist_wide.gin)
  OMP_NUM_THREADS=1 python -m components.seeds "${files[@]}" \
    --seeds 0 1 2 --out "$out" > "runs/logs/discovery-$data-$features.log" 2>&1
}
export -f run_one
mkdir -p runs/logs
printf '%s\n' "fmnist contrastive" "fmnist supervised" "fmnist supervised_wide" "digits contrastive" \
  "digits supervised" |
  xargs -P "${LANES:-2}" -L 1 bash -c 'run_one $0 $1'
