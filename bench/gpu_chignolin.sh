#!/usr/bin/env bash
# Chignolin on a lent GPU (issue 14 §4): the reference MD that this 2-core machine cannot make
# (GBn2 + HMR replicas on CUDA), then the rest of bench/bench_chignolin.py (flow-matching and
# force-matching CG, CG MD, protein evaluation), writing $OUT/chignolin/results.json.
#
#   bash bench/gpu_chignolin.sh        (from the repository root; writes into ${OUT:-bench/results})
#
# Sized for one 10-minute device call: 16 replicas x 0.5 ns on CUDA (16 worker processes on one
# GPU), then CG training and CG MD on the machine's CPU cores. Every stage is resumable, so a
# second call continues where a timed-out first one stopped (keep $OUT/chignolin between calls).
# Needs the pinned stack on the machine (torch <2.13, openmm, openmm-torch, mdtraj, deeptime,
# scipy): the device machine reaches no package index, so it checks and stops with what is
# missing instead of installing. Untested on a GPU so far (no GPU was lent when it was written).
set -euo pipefail
out="${OUT:-bench/results}"
py="${PYTHON:-python3}"
mkdir -p "$out/chignolin"
exec > >(tee -a "$out/gpu_chignolin.log") 2>&1

echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$py" - <<'PY'
import importlib.util, sys
need = ("torch", "openmm", "openmmtorch", "mdtraj", "deeptime", "scipy", "numpy")
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python modules on this machine: {missing}; install the pinned stack first")
import openmm
print("platforms", [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())])
PY

echo "== install (native plugin against this python's torch and openmm)"
FLOWFORCE_REQUIRE_NATIVE=1 "$py" -m pip install --no-deps --no-build-isolation -e . -q

echo "== chignolin: reference on CUDA, CG, CG MD, evaluation (stops itself before the call's limit)"
timeout --signal=INT "${BUDGET_S:-520}" "$py" bench/bench_chignolin.py --workdir "$out/chignolin" \
    --replicas 16 --workers 16 --time-ns 0.5 --cg-steps 400000 || echo "== stopped: run again to continue"
ls -la "$out/chignolin"
