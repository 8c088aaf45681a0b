#!/usr/bin/env bash
# Regenerate the README's picture, docs/img/pool_embedding.png: run the main job (digits-7/3,
# seed 0) into a scratch folder and copy its report's 2-D view of the pool.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python -m components.run --gin gin/distill.gin --quiet --run-dir "$scratch/run" \
  --gin-bindings "FeatureCache.root = '$scratch/cache'"
mkdir -p docs/img
cp "$scratch/run/pool_embedding.png" docs/img/pool_embedding.png
echo "wrote docs/img/pool_embedding.png"
