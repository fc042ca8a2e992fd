#!/usr/bin/env bash
# Before/after layout: the same benchmarks from each tree, alternated, on a quiet machine.
set -euo pipefail
PY=/work/main/.venv/bin/python
export FACENET_HF_LFW_DIR=/work/shared/data/lfw HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=/tmp/bench_ab
for round in 1 2; do
  for tree in before after; do
    dir=/tmp/before; [ $tree = after ] && dir=/work/main
    (cd $dir && PYTHONPATH=$dir $PY benchmarks/bench_mining.py --sizes 256,1024,1800 --k 8 --dim 128 --repeats 5 --no-pml --out $OUT/mining_${tree}_$round.json > $OUT/mining_${tree}_$round.log 2>&1)
    (cd $dir && PYTHONPATH=$dir $PY benchmarks/bench_train_step.py --methods full,floor --out $OUT/step_${tree}_$round.json > $OUT/step_${tree}_$round.log 2>&1)
    echo "$(date +%T) round $round $tree done"
  done
done
