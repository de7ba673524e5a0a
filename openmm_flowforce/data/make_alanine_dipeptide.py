"""Build, minimise and write the built-in alanine dipeptide (ACE-ALA-NME, 22 atoms).

Run from the repository root::

    python -m openmm_flowforce.data.make_alanine_dipeptide

The molecule is built from textbook peptide geometry (Engh & Huber bond lengths and
angles, tetrahedral CH3/CH groups, trans peptide bonds) in the C7eq region
(phi = -80 deg, psi = 75 deg), minimised in vacuum with amber14-all.xml (NoCutoff) on the
Reference platform, and written to ``alanine_dipeptide.pdb`` next to this file. The
Reference platform in double precision makes the output deterministic; the PDB carries
no date stamp, so re-running the script reproduces the committed file byte for byte.
"""
from __future__ import annotations

import io

from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

from openmm_flowforce.io import atomic_write_bytes

PDB_PATH = Path(__file__).with_name("alanine_dipeptide.pdb")
PHI_DEG = -80.0
PSI_DEG = 75.0

# Residue name -> atom names, in the order they are written (the usual order of the
# alanine-dipeptide files in the literature). Elements are the first letter of the name.
RESIDUES: list[tuple[str, list[str]]] = [
    ("ACE", ["H1", "CH3", "H2", "H3", "C", "O"]),
    ("ALA", ["N", "H", "CA", "HA", "CB", "HB1", "HB2", "HB3", "C", "O"]),
    ("NME", ["N", "H", "C", "H1", "H2", "H3"]),
]

# Build recipe: (atom, bonded-to, angle-with, torsion-with, bond / Angstrom,
# angle / deg, torsion / deg). Atoms are "RES:NAME"; the first three rows are seeded.
# Chirality: in L-alanine the torsion C(-1)-N-CA-CB is phi - 120 and C(-1)-N-CA-HA is
# phi + 120 (checked against the villin structure shipped with OpenMM).
BUILD: list[tuple[str, str, str, str, float, float, float]] = [
    ("ALA:N", "ACE:C", "ACE:CH3", "", 1.335, 116.6, 0.0),
    ("ACE:O", "ACE:C", "ACE:CH3", "ALA:N", 1.229, 120.5, 180.0),
    ("ALA:CA", "ALA:N", "ACE:C", "ACE:CH3", 1.458, 121.9, 180.0),
    ("ALA:H", "ALA:N", "ACE:C", "ACE:CH3", 1.010, 119.8, 0.0),
    ("ALA:C", "ALA:CA", "ALA:N", "ACE:C", 1.525, 111.2, PHI_DEG),
    ("ALA:CB", "ALA:CA", "ALA:N", "ACE:C", 1.530, 110.4, PHI_DEG - 120.0),
    ("ALA:HA", "ALA:CA", "ALA:N", "ACE:C", 1.090, 109.5, PHI_DEG + 120.0),
    ("NME:N", "ALA:C", "ALA:CA", "ALA:N", 1.335, 116.6, PSI_DEG),
    ("ALA:O", "ALA:C", "ALA:CA", "ALA:N", 1.229, 120.5, PSI_DEG + 180.0),
    ("NME:C", "NME:N", "ALA:C", "ALA:CA", 1.449, 121.9, 180.0),
    ("NME:H", "NME:N", "ALA:C", "ALA:CA", 1.010, 119.8, 0.0),
    ("ACE:H1", "ACE:CH3", "ACE:C", "ALA:N", 1.090, 109.5, 0.0),
    ("ACE:H2", "ACE:CH3", "ACE:C", "ALA:N", 1.090, 109.5, 120.0),
    ("ACE:H3", "ACE:CH3", "ACE:C", "ALA:N", 1.090, 109.5, -120.0),
    ("ALA:HB1", "ALA:CB", "ALA:CA", "ALA:N", 1.090, 109.5, 60.0),
    ("ALA:HB2", "ALA:CB", "ALA:CA", "ALA:N", 1.090, 109.5, 180.0),
    ("ALA:HB3", "ALA:CB", "ALA:CA", "ALA:N", 1.090, 109.5, -60.0),
    ("NME:H1", "NME:C", "NME:N", "ALA:C", 1.090, 109.5, 0.0),
    ("NME:H2", "NME:C", "NME:N", "ALA:C", 1.090, 109.5, 120.0),
    ("NME:H3", "NME:C", "NME:N", "ALA:C", 1.090, 109.5, -120.0),
]


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle_deg: float,
           torsion_deg: float) -> np.ndarray:
    """Position d with |d-c| = bond, angle(d, c, b) = angle and torsion(d, c, b, a) = torsion."""
    angle, torsion = np.radians(angle_deg), np.radians(torsion_deg)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    local = np.array([-np.cos(angle), np.sin(angle) * np.cos(torsion), np.sin(angle) * np.sin(torsion)])
    return c + bond * (local[0] * bc + local[1] * m + local[2] * n)


def build_positions_angstrom() -> dict[str, np.ndarray]:
    """Cartesian positions (Angstrom) of all 22 atoms, keyed "RES:NAME"."""
    pos: dict[str, np.ndarray] = {
        "ACE:CH3": np.zeros(3),
        "ACE:C": np.array([1.52, 0.0, 0.0]),
    }
    # Third atom (ALA:N) in the xy plane; its torsion column is unused.
    atom, j, k, _, bond, angle, _ = BUILD[0]
    theta = np.radians(180.0 - angle)
    pos[atom] = pos[j] + bond * np.array([np.cos(theta), np.sin(theta), 0.0])
    for atom, j, k, l, bond, angle, torsion in BUILD[1:]:
        pos[atom] = _place(pos[l], pos[k], pos[j], bond, angle, torsion)
    return pos


def build_topology() -> app.Topology:
    """OpenMM topology of ACE-ALA-NME with the peptide bonds; the rest come from templates."""
    top = app.Topology()
    chain = top.addChain("A")
    for res_name, names in RESIDUES:
        res = top.addResidue(res_name, chain)
        for name in names:
            top.addAtom(name, app.element.get_by_symbol(name[0]), res)
    top.createStandardBonds()
    return top


def _context(topology: app.Topology) -> openmm.Context:
    """amber14-all.xml in vacuum (NoCutoff, no constraints) on the Reference platform."""
    forcefield = app.ForceField("amber14-all.xml")
    system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=None)
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))


def vacuum_energy(topology: app.Topology, positions_nm: np.ndarray) -> float:
    """amber14 vacuum potential energy (kJ/mol) of positions (N, 3) in nm."""
    context = _context(topology)
    context.setPositions(positions_nm * unit.nanometer)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def minimise(topology: app.Topology, positions_nm: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Minimise with amber14 in vacuum; returns (positions nm, E before, E after) in kJ/mol."""
    context = _context(topology)
    context.setPositions(positions_nm * unit.nanometer)
    e0 = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    openmm.LocalEnergyMinimizer.minimize(context, 1e-3, 0)
    state = context.getState(getEnergy=True, getPositions=True)
    e1 = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return np.asarray(x), e0, e1


def write_pdb(topology: app.Topology, positions_nm: np.ndarray, path: Path) -> None:
    """Write atomically, without the date-stamped REMARK that OpenMM adds."""
    buf = io.StringIO()
    app.PDBFile.writeFile(topology, positions_nm * 10.0 * unit.angstrom, buf, keepIds=True)
    lines = [ln for ln in buf.getvalue().splitlines() if not ln.startswith("REMARK")]
    text = "REMARK   1 ALANINE DIPEPTIDE, AMBER14 VACUUM MINIMUM, make_alanine_dipeptide.py\n"
    text += "\n".join(lines) + "\n"
    atomic_write_bytes(path, text.encode())


def main(path: Path = PDB_PATH) -> None:
    topology = build_topology()
    pos = build_positions_angstrom()
    order = [f"{a.residue.name}:{a.name}" for a in topology.atoms()]
    assert sorted(order) == sorted(pos), "build recipe and residue list disagree"
    x0 = np.array([pos[name] for name in order]) / 10.0
    x, e0, e1 = minimise(topology, x0)
    write_pdb(topology, x, path)
    # Re-read what was written: the file, not the in-memory minimum, is what ships.
    pdb = app.PDBFile(str(path))
    x_file = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    e_file = vacuum_energy(pdb.topology, x_file)
    print(f"wrote {path}: {topology.getNumAtoms()} atoms, {topology.getNumBonds()} bonds")
    print(f"amber14 vacuum energy: built {e0:.3f} kJ/mol, minimised {e1:.3f} kJ/mol, "
          f"as written (3-decimal PDB) {e_file:.3f} kJ/mol")


if __name__ == "__main__":
    main()
