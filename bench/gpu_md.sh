#!/usr/bin/env bash
# The MD-speed table on a lent GPU, in one short run (issue 9 §5): builds the native plugin,
# compiles CUDA and CPU packages on the GPU machine, checks the plugin against the eager models on
# the CUDA platform, and runs bench/bench_md.py on Reference, CPU and CUDA.
#
#   bash bench/gpu_md.sh            (from the repository root; writes into ${OUT:-bench/results})
#
# Needs a Python with the pinned stack (torch 2.10-2.12 with CUDA, openmm, openmm-torch) on the
# machine: the device machine reaches no package index, so the script uses the python3 it finds
# (or $PYTHON) and says what is missing rather than installing. Budget: ~8 minutes on an H200.
set -euo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
log="$out/gpu_md.log"
exec > >(tee "$log") 2>&1

echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$py" - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "openmm", "openmmtorch", "mdtraj", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python modules on this machine: {missing}; install the pinned stack first")
import torch, openmm
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "openmm", openmm.__version__)
print("platforms", [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())])
PY

echo "== build the plugin (no build isolation: this python's torch and openmm)"
FLOWFORCE_REQUIRE_NATIVE=1 "$py" -m pip install --no-deps --no-build-isolation -e . -q
"$py" -m openmm_flowforce.cli.main doctor --native --json > "$out/gpu_doctor.json" || true

echo "== native plugin vs eager on CUDA (CG net and flow, float32 CUDA packages)"
"$py" - <<'PY'
import numpy as np, openmm, torch
from openmm import app, unit
from openmm_flowforce.data import alanine_dipeptide_pdb
from openmm_flowforce.export.backends import make_force
from openmm_flowforce.export.compiled import compile_package
from openmm_flowforce.potentials import BoltzmannGenerator
pdb = app.PDBFile(alanine_dipeptide_pdb())
x = pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
frames = x[None] + 0.01 * np.random.default_rng(0).normal(size=(256, 22, 3))
bg = BoltzmannGenerator.from_topology(pdb.topology, frames, n_layers=4, hidden=[64, 64], n_components=4)
pkg = compile_package(bg, "/tmp/flow_cuda.pt2", device="cuda")
system = openmm.System()
for atom in pdb.topology.atoms():
    system.addParticle(atom.element.mass)
system.addForce(make_force(pkg, backend="native"))
ctx = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("CUDA"))
ctx.setPositions(frames[3])
state = ctx.getState(getEnergy=True, getForces=True)
xt = torch.as_tensor(frames[3])[None].requires_grad_(True)
u = bg.double().energy(xt.double(), 300.0)
(g,) = torch.autograd.grad(u.sum(), xt)
f = state.getForces(asNumpy=True)._value
print("CUDA native vs eager: |dU| =", abs(state.getPotentialEnergy()._value - float(u)),
      "max|dF|/max|F| =", float(np.abs(f + g[0].numpy()).max() / np.abs(g[0].numpy()).max()))
PY

echo "== MD speed table"
"$py" bench/bench_md.py --steps 4000 --platforms CPU CUDA --package-device cuda --json "$out/bench_md_gpu.json"
