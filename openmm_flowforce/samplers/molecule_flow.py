"""The Boltzmann generator of a molecule as a flat flow for energy-only samplers (``flow: internal``).

FAB on alanine dipeptide (Midgley et al., ICLR 2023, arXiv 2208.01893) trains a flow on
internal coordinates from the energy alone. :class:`MoleculeFlow` gives the package's
:class:`~openmm_flowforce.potentials.BoltzmannGenerator` (internal coordinates → unit cube →
smooth coupling flow; Noé et al. 2019, arXiv 1812.01729; Köhler, Krämer, Noé 2021, arXiv
2110.00351) the interface of the flows the sampler methods train: flat Cartesian
positions ``x (B, 3N)`` in nm, ``log_prob``, ``sample``, ``sample_and_log_prob``,
``project``. FAB's AIS runs HMC either on Cartesian coordinates (``ais_space:
cartesian``), where both log q and u = E/kT are invariant to rigid motions (log q is the
density of the internal coordinates with respect to the Cartesian volume with the six
rigid-body degrees of freedom factored out, so p/q weights are those of the molecule's
shape), or on the standardised internal coordinates (``ais_space: internal``,
:meth:`MoleculeFlow.to_standard`), where every coordinate has about unit thermal spread
and the stiff X–H bonds no longer set the leapfrog step. Both densities pick up the same
Jacobian there, so the AIS weights are the same functions of the configuration.

No MD data is used. The internal-coordinate normalisation (:func:`prior_internal_coordinates`)
comes from the System and the built-in structure:

* bond b (nm): centre r₀ and scale sqrt(kT/k_b) of the force field's harmonic bond term,
  so an identity flow is the force field's bond Boltzmann factor;
* angle θ (as cos θ): centre cos θ₀, scale sin θ₀·sqrt(kT/k_θ) (the linearised spread);
* torsions: a torsion placed relative to a sibling (Z-matrix row (i, j, k, l) with l bonded
  to j: a methyl's second/third hydrogen, a chiral centre's substituents) is an interval
  coordinate centred on the built-in structure's value with scale
  :data:`SIBLING_TORSION_SCALE`; it carries the chirality, which the flow then cannot
  invert (the antipode costs (π/0.15)²/2 ≈ 220 kT in log q). All others (φ, ψ, ω, the
  methyl rotors) are circles, uniform at initialisation.

A flat model serialises as the plain Boltzmann generator too
(:func:`save_boltzmann_generator`), so ``flowforce sample`` and everything else that reads
Boltzmann-generator files reads a FAB-trained flow.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..coordinates import InternalCoordinates
from ..data.dataset import topology_to_pdb_text
from ..errors import FlowforceError
from ..flows import CouplingFlow
from ..potentials.boltzmann import BoltzmannGenerator

Tensor = torch.Tensor

#: Scale (rad) of the torsions placed relative to a sibling atom (module docstring): about
#: the thermal spread of an H–C–X–H' dihedral difference at 300 K, wide enough for the flow
#: to narrow it, narrow enough to fix the chirality.
SIBLING_TORSION_SCALE = 0.15


def _harmonic_terms(system: Any) -> tuple[dict[tuple[int, int], tuple[float, float]],
                                          dict[tuple[int, int, int], tuple[float, float]]]:
    """``{(i, j): (r0 nm, k kJ/mol/nm²)}`` and ``{(i, j, k): (θ0 rad, k kJ/mol/rad²)}`` of the System."""
    import openmm

    bonds, angles = {}, {}
    for force in system.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for n in range(force.getNumBonds()):
                i, j, r0, k = force.getBondParameters(n)
                bonds[(i, j)] = bonds[(j, i)] = (r0._value if hasattr(r0, "_value") else r0,
                                                 k._value if hasattr(k, "_value") else k)
        elif isinstance(force, openmm.HarmonicAngleForce):
            for n in range(force.getNumAngles()):
                i, j, m, theta0, k = force.getAngleParameters(n)
                value = (theta0._value if hasattr(theta0, "_value") else theta0, k._value if hasattr(k, "_value") else k)
                angles[(i, j, m)] = angles[(m, j, i)] = value
    return bonds, angles


@torch.no_grad()
def prior_internal_coordinates(topology: Any, system: Any, positions: np.ndarray, kT: float) -> InternalCoordinates:
    """Internal coordinates normalised from the force field and one structure (module docstring).

    Args:
        topology: ``openmm.app.Topology`` of the molecule.
        system: its ``openmm.System`` (harmonic bond and angle terms).
        positions: ``(N, 3)`` nm, the structure whose sibling torsions are the centres.
        kT: kJ/mol.

    Raises:
        FlowforceError: a bond or angle of the Z-matrix without a harmonic term in the System.
    """
    ic = InternalCoordinates.from_topology(topology)
    rows = ic.rows.tolist()
    bonds, angles = _harmonic_terms(system)
    bond_loc, bond_scale, cos_loc, cos_scale = [], [], [], []
    for i, j, *_ in rows[1:]:
        if (i, j) not in bonds:
            raise FlowforceError(f"the System has no harmonic bond {i}-{j}; the internal coordinates need one per bond")
        r0, k = bonds[(i, j)]
        bond_loc.append(r0)
        bond_scale.append(math.sqrt(kT / k))
    for i, j, k_, _ in rows[2:]:
        if (i, j, k_) not in angles:
            raise FlowforceError(f"the System has no harmonic angle {i}-{j}-{k_}; the internal coordinates need one")
        theta0, k = angles[(i, j, k_)]
        cos_loc.append(math.cos(theta0))
        cos_scale.append(math.sin(theta0) * math.sqrt(kT / k))
    ic.bond_loc.copy_(torch.tensor(bond_loc, dtype=torch.float64))
    ic.bond_scale.copy_(torch.tensor(bond_scale, dtype=torch.float64))
    ic.cos_loc.copy_(torch.tensor(cos_loc, dtype=torch.float64))
    ic.cos_scale.copy_(torch.tensor(cos_scale, dtype=torch.float64))
    bonded = {(a.index, b.index) for a, b in topology.bonds()} | {(b.index, a.index) for a, b in topology.bonds()}
    sibling = [(j, l) in bonded for _, j, _, l in rows[3:]]
    x = torch.as_tensor(np.asarray(positions, dtype=np.float64))[None]
    torsions = ic.to_internal(x)[2][0]
    ic.torsion_loc.copy_(torsions)
    ic.torsion_scale.fill_(SIBLING_TORSION_SCALE)
    ic.set_periodic_torsions([not s for s in sibling])
    return ic


class MoleculeFlow(nn.Module):
    """A :class:`BoltzmannGenerator` on flat Cartesian positions ``(B, 3N)`` nm.

    Args:
        generator: the Boltzmann generator (float64 recommended for FAB).
    """

    def __init__(self, generator: BoltzmannGenerator):
        super().__init__()
        self.generator = generator
        self.n_atoms = generator.n_atoms
        self.dim = 3 * self.n_atoms

    def _positions(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise FlowforceError(f"expected flat positions (B, {self.dim}) nm, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.n_atoms, 3)

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) ``(B,)`` of flat positions, invariant to rigid motions."""
        return self.generator.log_prob(self._positions(x))

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``(n, 3N)`` samples in the canonical frame and their log q ``(n,)``."""
        x, log_q = self.generator.sample_and_log_prob(int(n))
        return x.reshape(x.shape[0], -1), log_q

    def sample(self, n: int) -> Tensor:
        return self.sample_and_log_prob(n)[0]

    # -- the standardised internal coordinates (FAB's HMC space, ``ais_space: internal``) --
    def to_standard(self, x: Tensor) -> Tensor:
        """Flat positions → standardised internal coordinates ``z (B, 3N−6)``
        (:meth:`~openmm_flowforce.coordinates.InternalCoordinates.to_standard`)."""
        return self.generator.coordinates.to_standard(self._positions(x))[0]

    def from_standard(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``z`` → flat positions ``(B, 3N)`` in the canonical frame, log|det dx/dz| and the
        validity mask (:meth:`~openmm_flowforce.coordinates.InternalCoordinates.from_standard`)."""
        x, ladj, valid = self.generator.coordinates.from_standard(z)
        return x.reshape(x.shape[0], -1), ladj, valid

    def log_prob_standard(self, z: Tensor) -> Tensor:
        """log q(z) ``(B,)``: the flow's density of the standardised internal coordinates,
        ``log q(x) + log|det dx/dz|`` at x(z), computed without leaving z."""
        u, ladj = self.generator.coordinates.standard_to_unit(z)
        return self.generator.flow.log_prob(u) + ladj

    def project(self, x: Tensor) -> Tensor:
        """Remove the (unweighted) centre of the atoms: HMC on a rigid-motion-invariant
        density lets the molecule drift; log q and u do not change."""
        p = self._positions(x)
        return (p - p.mean(dim=1, keepdim=True)).reshape(x.shape[0], -1)


def internal_flow(target: Any, opts: Mapping[str, Any]) -> MoleculeFlow:
    """``flow: internal``: a :class:`MoleculeFlow` for a molecule target (one with
    ``topology``, ``system``, ``positions`` and ``kT``, e.g.
    :class:`~openmm_flowforce.targets.molecules.MoleculeTarget`)."""
    if getattr(target, "topology", None) is None or getattr(target, "system", None) is None:
        raise FlowforceError("flow: internal needs a molecule target (alanine-dipeptide, alanine-dipeptide-implicit); "
                             "use flow: real for the toy targets")
    ic = prior_internal_coordinates(target.topology, target.system, target.positions, target.kT)
    hidden = opts["hidden"]
    flow = CouplingFlow(ic.periodic, transform=opts["transform"], n_layers=int(opts["n_layers"]),
                        hidden=hidden if isinstance(hidden, int) else list(hidden),
                        n_components=int(opts["n_components"]))
    generator = BoltzmannGenerator(ic, flow, topology_to_pdb_text(target.topology, target.positions))
    return MoleculeFlow(generator)


def save_boltzmann_generator(model: MoleculeFlow, path: str | Path, temperature: float, system: Any = None,
                             extra_metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``model.generator`` as a Boltzmann-generator model file (the trainer's
    checkpoint format, read by :func:`~openmm_flowforce.potentials.boltzmann.load_boltzmann_generator`,
    ``flowforce sample`` and ``flowforce export``), atomically. With ``system`` (the
    target's ``openmm.System``) stored as XML, ``flowforce sample --reweight`` can weigh
    the samples by exp(−u)/q."""
    import openmm

    from ..io import CHECKPOINT_FORMAT, save_checkpoint

    metadata = {**model.generator.metadata(), "temperature": float(temperature), **dict(extra_metadata or {})}
    if system is not None:
        metadata["system_xml"] = openmm.XmlSerializer.serialize(system)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model.generator.state_dict(), "metadata": metadata,
                     "config": {}}, path)
