#!/usr/bin/env bash
# The README's digits-lt table (embedded data, about 5 minutes on 2 cores): every training
# method x seeds 0 1 2. Then: python scripts/longtail_table.py runs/digits-lt
set -euo pipefail
cd "$(dirname "$0")/.."
for m in ce logit_adjusted_loss balanced_softmax ldam_drw class_balanced_loss focal \
         sampler_class_balanced sampler_sqrt sampler_progressive tde; do
  out=runs/digits-lt/$m
  [ -f "$out/summary.json" ] && continue
  extra=(); [ "$m" != ce ] && extra=(--gin "gin/longtail/methods/$m.gin")
  python -m components.seeds --gin gin/longtail/digits_lt.gin "${extra[@]}" --seeds 0 1 2 --out "$out"
done
