#!/usr/bin/env bash
# Longer sampler runs on a lent GPU in one short run (issue 13 §2): FAB with the equivariant
# augmented flow on DW-4 (140 s of training) and LJ-13 (180 s), iDEM on LJ-55 with the paper's
# settings (120 s), each then evaluated on the CPU against the shared reference sets; writes
# $OUT/gpu_samplers.json (rewritten after every row) and $OUT/gpu_samplers.log.
#
#   bash bench/gpu_samplers.sh          (from the repository root; OUT defaults to bench/results)
#
# Budget: ~8 minutes on an H200 (440 s of training, the evaluations, start-up). Needs a python
# with torch (CUDA), numpy, scipy/POT as the package uses them; the device machine reaches no
# package index, so the script uses the python3 it finds (or $PYTHON) and the working tree via
# PYTHONPATH. Untested on a GPU when written (no device was lent to that session): the samplers
# have no device option and run inside `with torch.device(...)`; a row that fails is recorded
# with its error and the others still run. SCALE=0.05 makes it a CPU smoke test.
set -euo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
exec > >(tee "$out/gpu_samplers.log") 2>&1
echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device="${DEVICE:-cuda}"
extra=()
if [ -n "${LJ55_REFERENCE:-}" ]; then extra+=(--lj55-reference "$LJ55_REFERENCE"); fi
"$py" bench/gpu_samplers.py --device "$device" --scale "${SCALE:-1.0}" --out "$out/gpu_samplers.json" \
  --workdir "$out/gpu_samplers_ckpt" "${extra[@]}"
