#!/usr/bin/env bash
# Re-cluster every discovery run of scripts/discovery_table.sh from its checkpoint and cache
# (no training), in two geometries: cosine k-means on what the run clustered (the projector for
# contrastive runs, backbone features otherwise) and whitened backbone features
# (SemiSupervisedKMeans.whiten). The labeler and the k estimator get the same geometry. The
# clustering takes seconds; the k estimate (7 probe classes x 10 candidates) a few minutes on
# fmnist. Writes runs/discovery-recluster/<name>-<geometry>/seed<N>.
# Then: python scripts/discovery_table.py runs/discovery-recluster
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-runs/discovery}
OUT=${OUT:-runs/discovery-recluster}
one() {
  run=$1; geometry=$2; name=$(basename "$(dirname "$run")"); seed=$(basename "$run")
  out=$OUT/$name-$geometry/$seed
  [ -f "$out/metrics.json" ] && exit 0
  # the runs' operative configs carry the labeler they ran with; re-cluster with today's
  # gin/discovery/base.gin settings (N_INIT=10 restarts, DTC's probe-class k estimate with 3)
  extra=(--gin-bindings "SemiSupervisedKMeans.n_init = ${N_INIT:-10}"
         --gin-bindings 'estimate/SemiSupervisedKMeans.n_init = 3'
         --gin-bindings "estimate/SemiSupervisedKMeans.estimate = 'probe'")
  if [ "$geometry" = whitened ]; then
    extra+=(--gin-bindings "recluster_run.cluster_on = 'features'")
    whiten=True; normalize=False
  else
    whiten=False; normalize=True
  fi
  for s in SemiSupervisedKMeans estimate/SemiSupervisedKMeans; do
    extra+=(--gin-bindings "$s.whiten = $whiten" --gin-bindings "$s.normalize = $normalize")
  done
  OMP_NUM_THREADS=1 python -m components.run --quiet --gin "$run/operative_config.gin" \
    --gin-bindings 'run.graph = @recluster_run' --gin-bindings "recluster_run.source = '$run'" \
    --gin-bindings "FeatureCache.root = '${CACHE:-cache}'" "${extra[@]}" --run-dir "$out" > /dev/null 2>&1
}
export -f one
export OUT CACHE N_INIT
for run in "$ROOT"/*/seed*; do for g in cosine whitened; do echo "$run $g"; done; done |
  xargs -P "${LANES:-2}" -L 1 bash -c 'one $0 $1'
