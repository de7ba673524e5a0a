#!/usr/bin/env bash
# Short CPU runs of FAB and reverse KL with the SE(3)-equivariant augmented flow on DW-4
# (issue 13 §2): each trains for at most $BUDGET seconds (SIGINT then: the engine finishes
# the step in flight and saves), then `flowforce sampler evaluate` compares 1000 samples with
# 1000 reference samples of the shared DW-4 test set (W2, energy W2, TV, NLL, ESS).
#
#   bash bench/bench_equivariant_cpu.sh            (writes into ${OUT:-bench/results/equivariant_cpu})
#
# Small on purpose (the machine was shared by 7 jobs on 2 cores): 6 coupling blocks, EGNN
# width 16, one message-passing layer per block, affine transforms (analytic inverse).
set -euo pipefail
out="${OUT:-bench/results/equivariant_cpu}"
budget="${BUDGET:-240}"
data="${FLOWFORCE_SHARED_DATA:-/work/shared/data}"
mkdir -p "$out"
cat > "$out/small.yaml" <<'YAML'
options: {transform: affine, n_layers: 6, hidden: 16, egnn_layers: 1, n_importance: 20}
YAML
cat > "$out/small_fab.yaml" <<'YAML'
options: {transform: affine, n_layers: 6, hidden: 16, egnn_layers: 1, n_importance: 20, min_buffer: 256}
YAML
run() {  # name method config steps
  timeout -s INT "$budget" flowforce sampler train --target dw4 --method "$2" --flow equivariant \
    --config "$out/$3" --steps "$4" --out "$out/$1.ckpt" --quiet || true
  flowforce sampler evaluate "$out/$1.ckpt" --reference "$data/dw4/test.npy" -n 1000 --out "$out/$1.json"
}
run dw4_eq_reverse_kl reverse-kl small.yaml 5000
run dw4_eq_fab fab small_fab.yaml 1000
