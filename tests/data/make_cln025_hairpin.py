"""Make tests/data/cln025_hairpin.pdb: a compact, hairpin-shaped CLN025 for the protein
evaluation tests (a stand-in for the folded structure; NOT the NMR/crystal structure 5AWL).

Start: the extended frame /work/shared/data/cln025/cln025.pdb (noegroup/aggforce, Apache-2.0).
amber14-all + implicit/gbn2, 300 K Langevin, with flat-bottom restraints pulling the Cα pairs
(i, 9 - i) of the two strands (Y1-Y10, Y2-W9, D3-T8) within 0.55 nm, then the restraints are
removed and the structure is minimised. Run: python tests/data/make_cln025_hairpin.py
(about a minute on one core; the result depends on the platform's floating point).
"""
import sys
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

SOURCE = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/cln025/cln025.pdb")
OUT = Path(__file__).with_name("cln025_hairpin.pdb")

pdb = app.PDBFile(str(SOURCE))
ff = app.ForceField("amber14-all.xml", "implicit/gbn2.xml")
system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
ca = [a.index for a in pdb.topology.atoms() if a.name == "CA"]
pull = openmm.CustomBondForce("k * step(r - r0) * (r - r0)^2")
pull.addGlobalParameter("k", 5000.0)
pull.addPerBondParameter("r0")
for i in range(3):
    pull.addBond(ca[i], ca[9 - i], [0.55])
system.addForce(pull)
integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5 / unit.picosecond, 2 * unit.femtosecond)
integrator.setRandomNumberSeed(1)
sim = app.Simulation(pdb.topology, system, integrator, openmm.Platform.getPlatformByName("CPU"))
sim.context.setPositions(pdb.positions)
sim.minimizeEnergy()
sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
sim.step(20000)
sim.context.setParameter("k", 0.0)
sim.minimizeEnergy()
positions = sim.context.getState(getPositions=True).getPositions(asNumpy=True)
x = positions.value_in_unit(unit.nanometer)[ca]
d = np.linalg.norm(x[:, None] - x[None], axis=-1)
print("cross-strand Ca distances (nm):", [round(float(d[i, 9 - i]), 3) for i in range(5)])
with open(OUT, "w") as handle:
    app.PDBFile.writeFile(pdb.topology, positions, handle, keepIds=True)
print(f"wrote {OUT}")
