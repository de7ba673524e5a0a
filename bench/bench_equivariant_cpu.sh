#!/usr/bin/env bash
# Short CPU runs of FAB and reverse KL with the SE(3)-equivariant augmented flow (issue 13 §2):
# each trains for at most $BUDGET seconds (SIGINT then: the engine finishes the step in
# flight and saves), then `flowforce sampler evaluate` compares 1000 samples with 1000
# reference samples of the shared test set (W2, energy W2, TV, NLL, ESS).
#
#   bash bench/bench_equivariant_cpu.sh              DW-4: reverse KL and FAB
#   TARGET=lj13 bash bench/bench_equivariant_cpu.sh  LJ-13: reverse KL and FAB (no aligned W2: minutes on
#                                                    LJ-13; the preset's 100 kT energy cut applies)
#
# Writes into ${OUT:-bench/results/equivariant_cpu}. Small on purpose (the machine was shared
# by 7 jobs on 2 cores): 6 coupling blocks, EGNN width 16, one message-passing layer per
# block, affine transforms (analytic inverse).
set -euo pipefail
out="${OUT:-bench/results/equivariant_cpu}"
budget="${BUDGET:-240}"
target="${TARGET:-dw4}"
data="${FLOWFORCE_SHARED_DATA:-/work/shared/data}"
case "$target" in dw4|lj13) ;; *) echo "TARGET must be dw4 or lj13, not $target" >&2; exit 2 ;; esac
mkdir -p "$out"
small="transform: affine, n_layers: 6, hidden: 16, egnn_layers: 1, n_importance: 20"
echo "options: {$small}" > "$out/small.yaml"
echo "options: {$small, min_buffer: 256}" > "$out/small_fab.yaml"
run() {  # name method config steps [evaluate options]; a run whose JSON exists is kept
  [ -f "$out/$1.json" ] && { echo "kept $out/$1.json"; return; }
  timeout -s INT "$budget" flowforce sampler train --target "$target" --method "$2" --flow equivariant \
    --config "$out/$3" --steps "$4" --out "$out/$1.ckpt" --quiet || true
  flowforce sampler evaluate "$out/$1.ckpt" --reference "$data/$target/test.npy" -n 1000 "${@:5}" --out "$out/$1.json"
}
case "$target" in
  dw4) run dw4_eq_reverse_kl reverse-kl small.yaml 5000
       run dw4_eq_fab fab small_fab.yaml 1000 ;;
  lj13) run lj13_eq_reverse_kl reverse-kl small.yaml 5000 --no-align
        run lj13_eq_fab fab small_fab.yaml 1000 --no-align ;;
esac
