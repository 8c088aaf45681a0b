#!/usr/bin/env bash
# Re-cluster every discovery run of scripts/discovery_table.sh from its checkpoint and cache
# (seconds each, no training), in two geometries: as the run clustered (cosine; the projector
# for contrastive runs) and whitened backbone features (SemiSupervisedKMeans.whiten). The
# labeler and the k estimator get the same geometry. Writes runs/discovery-recluster/<name>/seed<N>.
# Then: python scripts/discovery_table.py runs/discovery-recluster
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-runs/discovery}
OUT=${OUT:-runs/discovery-recluster}
one() {
  run=$1; geometry=$2; name=$(basename "$(dirname "$run")"); seed=$(basename "$run")
  out=$OUT/$name-$geometry/$seed
  [ -f "$out/metrics.json" ] && exit 0
  extra=()
  if [ "$geometry" = whitened ]; then
    extra=(--gin-bindings "recluster_run.cluster_on = 'features'")
    for s in SemiSupervisedKMeans estimate/SemiSupervisedKMeans; do
      extra+=(--gin-bindings "$s.whiten = True" --gin-bindings "$s.normalize = False")
    done
  fi
  OMP_NUM_THREADS=1 python -m components.run --quiet --gin "$run/operative_config.gin" \
    --gin-bindings 'run.graph = @recluster_run' --gin-bindings "recluster_run.source = '$run'" \
    --gin-bindings "FeatureCache.root = '${CACHE:-cache}'" "${extra[@]}" --run-dir "$out" > /dev/null 2>&1
}
export -f one
export OUT CACHE
for run in "$ROOT"/*/seed*; do for g in as_run whitened; do echo "$run $g"; done; done |
  xargs -P "${LANES:-2}" -L 1 bash -c 'one $0 $1'
