#!/usr/bin/env bash
# The README's fmnist-lt table: every training method x ratios 100 and 10 x seeds 0 1 2.
# Two single-threaded lanes share the 2 cores; each job is `python -m components.seeds`.
# Then: python -m components.tables runs/fmnist-lt-100 runs/fmnist-lt-10
set -euo pipefail
cd "$(dirname "$0")/.."
methods="ce logit_adjusted_loss balanced_softmax ldam_drw class_balanced_loss focal sampler_class_balanced sampler_sqrt sampler_progressive tde"
jobs=()
for ratio in 10 100; do
  for m in $methods; do jobs+=("$ratio $m"); done
done
run_one() {
  ratio=$1; m=$2; out=runs/fmnist-lt-$ratio/$m
  [ -f "$out/summary.json" ] && exit 0
  extra=(); [ "$m" != ce ] && extra=(--gin "gin/longtail/methods/$m.gin")
  OMP_NUM_THREADS=1 python -m components.seeds --gin gin/longtail/fmnist_lt.gin "${extra[@]}" \
    --gin-bindings "RATIO = $ratio" --seeds 0 1 2 --out "$out" > "runs/logs/fmnist-lt-$ratio-$m.log" 2>&1
}
export -f run_one
mkdir -p runs/logs
printf '%s\n' "${jobs[@]}" | xargs -P "${LANES:-2}" -L 1 bash -c 'run_one $0 $1'
