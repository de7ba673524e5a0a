#!/usr/bin/env bash
# Chignolin: how flow-matching CG moves with more reference data (issue 14 §4, "honest limits").
#
# From the reference of bench_chignolin.py (WORK/ref.npz: 4 replicas x 0.25 ns, GBn2 + HMR, 340 K):
#   1. four more replicas with another seed (flowforce md --seed 1), joined into 8 (flowforce convert);
#   2. the reference against itself: set B vs set A, even vs odd replicas of the 8;
#   3. flow-matching CG models (MLP, weighted dihedral features, contact rule) from 500 (every 2nd
#      frame of the 4), 1000 (the 4) and 2000 (the 8) frames, seeds 0..SEEDS-1, 1 ns of native CG MD
#      each, all evaluated against the 8 replicas;
#   4. bench/results/chignolin/data_curve.json (bench/collect_chignolin_curve.py).
# Every stage is skipped when its output exists, so the same command continues after a stop.
#
#   WORK=chig SEEDS=3 bash bench/chignolin_data_curve.sh      # ~1 h of md on 2 cores, ~7 min per CG model
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-chig}
SEEDS=${SEEDS:-3}
FOLDED=$REPO/bench/data/5awl_cln025.pdb
export OMP_NUM_THREADS=1
cd "$WORK"

[ -f ref_b.npz ] || flowforce md --pdb "$REPO/tests/data/cln025_hairpin.pdb" --solvent gbn2 --hmr --temperature 340 \
    --replicas 4 --workers 2 --starts input,unfolded --unfold-ps 100 --equilibration-ps 10 \
    --time-ns 0.25 --save-every-ps 1 --no-progress --seed 1 --out ref_b.npz
[ -f ref8.npz ] || flowforce convert ref.npz ref_b.npz --out ref8.npz
[ -f half.npz ] || python - <<'EOF'
from openmm_flowforce.data.dataset import load_dataset, save_dataset
d = load_dataset("ref.npz")
save_dataset("half.npz", topology=d.topology, positions=d.positions[::2], energies=d.energies[::2],
             forces=d.forces[::2], temperature=d.temperature, timestep_fs=d.timestep_fs,
             save_every_ps=2 * d.save_every_ps, source=f"every 2nd frame of ref.npz ({d.source})",
             system=d.system_xml, replica=d.replica[::2], provenance=d.provenance)
EOF
[ -f refb_vs_refa.json ] || flowforce evaluate --protein ref_b.npz --reference ref.npz --folded "$FOLDED" --out refb_vs_refa.json
if [ ! -f ref8_halves.json ]; then
    mkdir -p halves8
    python -c "import sys; sys.path.insert(0, '$REPO/bench'); from pathlib import Path; from bench_chignolin import split_by_replica; split_by_replica(Path('ref8.npz'), Path('halves8'))"
    flowforce evaluate --protein halves8/ref_odd.npz --reference halves8/ref_even.npz --folded "$FOLDED" --out ref8_halves.json
fi

printf '# chignolin (Ca beads) flow-matching: smooth dihedral features, samples within the data contacts\nnet: {dihedral_features: weighted}\ncontact_factor: 1.0\n' > curve_cg.yaml
for seed in $(seq 0 $((SEEDS - 1))); do
    for pair in 500:half.npz 1000:ref.npz 2000:ref8.npz; do
        frames=${pair%%:*}; data=${pair#*:}; run=curve/d${frames}_s${seed}
        [ -f "$run/report.json" ] && continue
        mkdir -p "$run"
        { cat curve_cg.yaml; echo "seed: $seed"; } > "$run/cg.yaml"
        flowforce cg "$data" --mapping ca --method flow-matching --net mlp --quiet --config "$run/cg.yaml" --out "$run/cg.ckpt"
        flowforce export "$run/cg.ckpt" --out "$run/cg.pt" --compile --threads 1
        flowforce simulate "$run/cg.pt2" --topology "$run/cg.pdb" --backend native --platform auto --steps 200000 \
            --timestep-fs 5 --temperature 340 --report "$run/cg.csv" --report-interval 400 --out "$run/cg.dcd"
        flowforce evaluate --protein "$run/cg.dcd" --topology "$run/cg.pdb" --reference ref8.npz --folded "$FOLDED" \
            --out "$run/report.json"
    done
done
python "$REPO/bench/collect_chignolin_curve.py" --work . --out "$REPO/bench/results/chignolin/data_curve.json" \
    --plot "$REPO/bench/results/chignolin/data_curve.png"
