#!/usr/bin/env bash
# The continual loop's table in docs/loop.md: digits-phased and fmnist-phased, phases in the
# order of the protocol and reversed, seeds 0 1 2, one run at a time (so seconds per run are
# what one run takes on the machine). Then: python scripts/continual_table.py runs/continual
set -euo pipefail
cd "$(dirname "$0")/.."
REVERSED="make_protocol.phases = [[0, 1, 2, 3, 4], [7, 8, 9], [5, 6]]"
run() {  # name gin [bindings...]
  out=runs/continual/$1; gin=$2; shift 2
  [ -f "$out/summary.json" ] && return 0
  extra=(); for b in "$@"; do extra+=(--gin-bindings "$b"); done
  python -m components.seeds --gin "$gin" --seeds ${SEEDS:-0 1 2} --out "$out" "${extra[@]}"
}
run digits gin/continual.gin
run digits-reversed gin/continual.gin "$REVERSED"
run fmnist gin/continual_fmnist.gin
run fmnist-reversed gin/continual_fmnist.gin "$REVERSED"
