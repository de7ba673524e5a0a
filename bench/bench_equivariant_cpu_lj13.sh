#!/usr/bin/env bash
# Short CPU run of reverse KL with the equivariant augmented flow on LJ-13 (issue 13 §2):
# at most $BUDGET seconds of training (SIGINT: the engine saves at the step boundary), then
# `flowforce sampler evaluate` on 1000 samples vs 1000 of the shared LJ-13 test set (no
# aligned W2: minutes on LJ-13). Same small flow as bench_equivariant_cpu.sh; the LJ-13
# preset's 100 kT energy cut applies.
#
#   bash bench/bench_equivariant_cpu_lj13.sh      (writes into ${OUT:-bench/results/equivariant_cpu})
set -euo pipefail
out="${OUT:-bench/results/equivariant_cpu}"
budget="${BUDGET:-240}"
data="${FLOWFORCE_SHARED_DATA:-/work/shared/data}"
mkdir -p "$out"
cat > "$out/small_lj13.yaml" <<'YAML'
options: {transform: affine, n_layers: 6, hidden: 16, egnn_layers: 1, n_importance: 20}
YAML
timeout -s INT "$budget" flowforce sampler train --target lj13 --method reverse-kl --flow equivariant \
  --config "$out/small_lj13.yaml" --steps 5000 --out "$out/lj13_eq_reverse_kl.ckpt" --quiet || true
flowforce sampler evaluate "$out/lj13_eq_reverse_kl.ckpt" --reference "$data/lj13/test.npy" -n 1000 --no-align \
  --out "$out/lj13_eq_reverse_kl.json"
