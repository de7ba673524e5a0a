r"""Coarse-grained (CG) mappings: which atoms each bead stands for, and how positions and
forces are carried over.

A mapping is linear. Bead ``I`` stands for a group of atoms ``G_I``; its position is a
weighted mean and its force the sum of its atoms' forces:

    X_I = Σ_{i∈G_I} c_Ii x_i   (Σ_i c_Ii = 1),          F_I = Σ_{i∈G_I} f_i.

Two kinds of bead, :data:`BEAD_KINDS`:

* ``slice``: ``G_I`` is one atom, ``c = 1``; the bead *is* that atom (``ca``, ``backbone``,
  any selection);
* ``com``: ``G_I`` is a group, ``c_Ii = m_i / M_I`` (centre of mass; ``residue-com``).

Force map. ``F_I = Σ_{i∈G_I} f_i`` ("summed over the mapped atoms", the *aggregate* force map;
for a slice bead it is the force on its one atom). With disjoint groups,
``Σ_i Φ_Ii c_Ji = δ_IJ``, which is the condition under which the mapped force is an unbiased
(noisy) estimate of the mean force −∇U_CG, so force matching converges to the potential of
mean force (Noid et al., J. Chem. Phys. 128, 244114 (2008); Köhler, Chen, Krämer, Clementi,
Noé, JCTC 2023, arXiv:2203.11167). Groups therefore may not overlap (checked); they need not
cover every atom: forces on unmapped atoms are dropped. Not handled by this map: constraint
forces. With bond constraints (e.g. ``HBonds``) the forces OpenMM reports omit the constraint
forces, and a slice bead whose atom is constrained to an unmapped atom gets a biased force;
generate force-matching data without constraints, use groups that contain whole constrained
clusters (as ``residue-com`` does), or the optimal force map of
:mod:`~openmm_flowforce.coordinates.force_maps`, which is blind to constraint forces and also
less noisy.

Bonds. Beads are ordered along the chain (by residue, then by the preset's order within a
residue: N, CA, C for ``backbone``; by atom index for selections). Consecutive beads are bonded
when they lie in the same chain and in the same molecule (connected component of the all-atom
bond graph; a topology without any bonds is treated as one molecule per chain). This is the
linear-chain CG model of CGSchNet-style work; branched mappings are out of scope.

Capped peptides (``backbone``). The backbone of residue ``i`` is N, CA, C. The caps have no
CA; their *backbone atoms* are the atoms of the peptide bond they make with the neighbouring
residue: ACE's carbonyl ``C`` and NME's (or NHE's) amide ``N``. The caps' methyl carbons
(ACE ``CH3``; NME ``C`` in Amber naming, ``CH3`` elsewhere) are *not* beads: they play the
role of the missing neighbour's CA. For ACE-ALA-NME this gives 5 beads
``ACE:C, ALA:N, ALA:CA, ALA:C, NME:N`` whose dihedrals (0,1,2,3) and (1,2,3,4) are φ and ψ.
Note the trap: the selection ``name N CA C`` would also pick NME's methyl ``C``.

Bead types (:data:`BEAD_TYPES`, for networks that embed the bead's chemistry, e.g. CGSchNet):
a Cα or residue bead of a standard amino acid has its residue's type (protonation and
disulfide variants folded: HID/HIE/HIP → HIS, CYX → CYS...); a backbone ``N`` or ``C`` bead
(caps included) has the type ``N`` or ``C`` whatever its residue; a cap residue's bead has
``CAP``; anything else ``X``. Rule: :func:`bead_type`.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..io import atomic_write_bytes
from ..errors import FlowforceError

__all__ = ["BEAD_KINDS", "BEAD_TYPES", "CGMapping", "MAPPING_FORMAT", "MAPPING_PRESETS", "bead_type",
           "register_mapping"]

#: Format tag written by :meth:`CGMapping.to_dict`.
MAPPING_FORMAT = "openmm-flowforce/cg-mapping/1"
BEAD_KINDS = ("slice", "com")
#: Name of centre-of-mass beads. The "X" start keeps OpenMM's and mdtraj's PDB readers from
#: guessing an element from the name (both give no element / a virtual site).
COM_BEAD_NAME = "XCM"
#: Cap residues: their backbone atoms (the atoms of the peptide bond to the neighbour).
CAP_BACKBONE_ATOMS = {"ACE": ("C",), "NME": ("N",), "NHE": ("N",), "NH2": ("N",)}
PROTEIN_BACKBONE_ATOMS = ("N", "CA", "C")
#: Bead type vocabulary: the 20 amino acids, backbone amide N and carbonyl C beads, cap
#: residues, other. Append only: a net stores type indices into this list.
BEAD_TYPES = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET", "PHE",
              "PRO", "SER", "THR", "TRP", "TYR", "VAL", "N", "C", "CAP", "X")
#: Residue name variants (protonation states, disulfides, Amber termini naming) → amino acid.
RESIDUE_ALIASES = {"HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS",
                   "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS", "MSE": "MET"}


def bead_type(name: str, residue_name: str) -> str:
    """Type in :data:`BEAD_TYPES` of a bead named ``name`` in residue ``residue_name`` (module
    docstring): ``N``/``C`` for backbone N and C beads, the amino acid otherwise, ``CAP`` for
    cap residues, ``X`` for the rest."""
    if name in ("N", "C"):
        return name
    residue = RESIDUE_ALIASES.get(residue_name, residue_name)
    if residue in BEAD_TYPES[:20]:
        return residue
    return "CAP" if residue_name in CAP_BACKBONE_ATOMS else "X"


@dataclass(frozen=True)
class _Atom:
    index: int
    name: str
    element: str | None
    mass: float  # dalton
    residue: int  # residue index in the topology
    chain: int  # chain index in the topology


@dataclass(frozen=True)
class _Residue:
    name: str
    id: str
    chain: int
    chain_id: str


class _Source:
    """The parts of an OpenMM or mdtraj topology a mapping needs, in plain Python."""

    def __init__(self, topology: Any):
        module, name = type(topology).__module__, type(topology).__qualname__
        if name == "Topology" and module.startswith(("openmm.app", "simtk.openmm.app")):
            from openmm import unit

            self.openmm = topology
            self.atoms = [self._atom(a, a.element.mass.value_in_unit(unit.dalton) if a.element is not None else 0.0)
                          for a in topology.atoms()]
            self.residues = [_Residue(r.name, str(r.id), r.chain.index, str(r.chain.id)) for r in topology.residues()]
            self.bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
        elif name == "Topology" and module.startswith("mdtraj"):
            self.openmm = None
            self._mdtraj = topology
            self.atoms = [self._atom(a, float(a.element.mass) if a.element is not None else 0.0)
                          for a in topology.atoms]
            self.residues = [_Residue(r.name, str(r.resSeq), r.chain.index,
                                      str(getattr(r.chain, "chain_id", None) or chr(ord("A") + r.chain.index % 26)))
                             for r in topology.residues]
            self.bonds = [(b[0].index, b[1].index) for b in topology.bonds]
        else:
            raise TypeError(f"topology must be an openmm.app.Topology or an mdtraj.Topology, got {module}.{name}; "
                            "for a trajectory pass traj.topology, for a PDBFile pass pdb.topology")

    @staticmethod
    def _atom(atom: Any, mass: float) -> _Atom:
        symbol = atom.element.symbol if atom.element is not None else None
        if symbol == "VS":  # mdtraj's virtual site
            symbol = None
        return _Atom(atom.index, atom.name, symbol, float(mass), atom.residue.index, atom.residue.chain.index)

    def mdtraj(self) -> Any:
        if self.openmm is None:
            return self._mdtraj
        import mdtraj

        return mdtraj.Topology.from_openmm(self.openmm)

    def atoms_by_residue(self) -> list[list[_Atom]]:
        out: list[list[_Atom]] = [[] for _ in self.residues]
        for atom in self.atoms:
            out[atom.residue].append(atom)
        return out

    def molecules(self) -> np.ndarray:
        """Connected component of every atom; one component per chain when there are no bonds."""
        if not self.bonds:
            return np.array([a.chain for a in self.atoms])
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        pairs = np.array(self.bonds, dtype=np.int64)
        n = len(self.atoms)
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        return connected_components(graph, directed=False)[1]


# -- presets: name -> function(source) -> (groups of atom indices, bead kind) -------------------
PresetFunction = Callable[[_Source], tuple[list[list[int]], str]]
MAPPING_PRESETS: dict[str, PresetFunction] = {}


def register_mapping(name: str) -> Callable[[PresetFunction], PresetFunction]:
    """Decorator adding a preset ``function(source) -> (groups, kind)`` to the registry."""
    def decorate(function: PresetFunction) -> PresetFunction:
        if name in MAPPING_PRESETS:
            raise FlowforceError(f"mapping preset {name!r} is already registered")
        MAPPING_PRESETS[name] = function
        return function
    return decorate


def _is_amino_acid(atoms: Sequence[_Atom]) -> bool:
    names = {a.name: a for a in atoms}
    ca = names.get("CA")
    # An atom named CA next to N and C; excludes calcium ions (residue CA, element Ca).
    return ca is not None and ca.element in ("C", None) and "N" in names and "C" in names


@register_mapping("ca")
def _ca(source: _Source) -> tuple[list[list[int]], str]:
    """One bead per amino acid, on its Cα."""
    return [[a.index] for atoms in source.atoms_by_residue() if _is_amino_acid(atoms)
            for a in atoms if a.name == "CA"], "slice"


@register_mapping("backbone")
def _backbone(source: _Source) -> tuple[list[list[int]], str]:
    """N, CA, C of every amino acid plus the caps' peptide-bond atoms (ACE C, NME N)."""
    groups = []
    for residue, atoms in zip(source.residues, source.atoms_by_residue()):
        wanted = CAP_BACKBONE_ATOMS.get(residue.name, PROTEIN_BACKBONE_ATOMS if _is_amino_acid(atoms) else ())
        by_name = {a.name: a.index for a in atoms}
        groups.extend([by_name[name]] for name in wanted if name in by_name)
    return groups, "slice"


@register_mapping("residue-com")
def _residue_com(source: _Source) -> tuple[list[list[int]], str]:
    """One bead per residue at its centre of mass (all atoms, hydrogens included)."""
    return [[a.index for a in atoms] for atoms in source.atoms_by_residue() if atoms], "com"


class CGMapping:
    """A linear map from an all-atom molecule to CG beads (see the module docstring).

    Build with :meth:`from_topology`. Attributes (plain Python / numpy, all per bead):

    Attributes:
        n_atoms: atoms of the all-atom system.
        groups: atom indices of every bead.
        weights: position weights ``c_Ii`` of every bead (sum to 1).
        kind: ``"slice"`` or ``"com"``.
        names: bead (atom) names, e.g. ``N``, ``CA``, ``C``; ``XCM`` for COM beads.
        types: bead types, names in :data:`BEAD_TYPES` (default: :func:`bead_type` of the
            name and residue name); :attr:`type_indices` are their indices.
        elements: element symbol of a slice bead's atom; ``None`` for COM beads.
        masses: ``(n,)`` bead masses in dalton, the summed masses of each group.
        residues: ``(chain index, chain id, residue name, residue id)`` of every bead.
        bonds: ``(I, J)`` bead pairs, consecutive beads of one chain and molecule.
        source: how the mapping was made, e.g. ``{"preset": "backbone"}``.
    """

    def __init__(self, n_atoms: int, groups: Sequence[Sequence[int]], weights: Sequence[Sequence[float]], kind: str,
                 names: Sequence[str], elements: Sequence[str | None], masses: Sequence[float],
                 residues: Sequence[Sequence[Any]], bonds: Sequence[Sequence[int]],
                 source: dict[str, Any] | None = None, types: Sequence[str] | None = None):
        if kind not in BEAD_KINDS:
            raise FlowforceError(f"unknown bead kind {kind!r}; valid: {', '.join(BEAD_KINDS)}")
        n = len(groups)
        if n == 0:
            raise FlowforceError("a CG mapping needs at least one bead")
        for name, values in (("weights", weights), ("names", names), ("elements", elements), ("masses", masses),
                             ("residues", residues)):
            if len(values) != n:
                raise FlowforceError(f"{name} has {len(values)} entries for {n} beads")
        flat = [i for g in groups for i in g]
        if any(not 0 <= i < n_atoms for i in flat):
            raise FlowforceError(f"atom indices must be in [0, {n_atoms}), got {sorted(set(flat))[:5]}...")
        if len(set(flat)) != len(flat):
            shared = sorted({i for i in flat if flat.count(i) > 1})
            raise FlowforceError(f"bead groups overlap (atoms {shared[:10]} are in several beads); the aggregate "
                                 "force map is a valid mean-force estimate only for disjoint groups")
        for g, w in zip(groups, weights):
            if len(g) != len(w) or len(g) == 0 or abs(sum(w) - 1.0) > 1e-9:
                raise FlowforceError(f"bead group {list(g)} has weights {list(w)}; they must be one per atom and "
                                     "sum to 1")
        if any(not (0 <= i < n and 0 <= j < n and i != j) for i, j in bonds):
            raise FlowforceError(f"bonds must join two different beads in [0, {n}), got {[tuple(b) for b in bonds]}")
        self.n_atoms = int(n_atoms)
        self.groups = [tuple(int(i) for i in g) for g in groups]
        self.weights = [tuple(float(c) for c in w) for w in weights]
        self.kind = kind
        self.names = [str(s) for s in names]
        self.elements = [None if e is None else str(e) for e in elements]
        self.masses = np.asarray(masses, dtype=np.float64)
        self.residues = [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in residues]
        self.bonds = [(int(i), int(j)) for i, j in bonds]
        self.source = dict(source or {})
        self.types = ([bead_type(name, r[2]) for name, r in zip(self.names, self.residues)] if types is None
                      else [str(t) for t in types])
        unknown_types = sorted(set(self.types) - set(BEAD_TYPES))
        if len(self.types) != n or unknown_types:
            raise FlowforceError(f"bead types must be one per bead from {', '.join(BEAD_TYPES)}; got {len(self.types)} "
                                 f"types for {n} beads, unknown {unknown_types}")
        self._position_matrix = np.zeros((n, self.n_atoms))
        self._force_matrix = np.zeros((n, self.n_atoms))
        for bead, (g, w) in enumerate(zip(self.groups, self.weights)):
            self._position_matrix[bead, list(g)] = w
            self._force_matrix[bead, list(g)] = 1.0

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_topology(cls, topology: Any, preset: str | None = None, *, selection: str | None = None,
                      group_by: str = "atom") -> "CGMapping":
        """A mapping of an OpenMM or mdtraj topology, by preset or by mdtraj selection.

        Args:
            topology: ``openmm.app.Topology`` or ``mdtraj.Topology``.
            preset: a name in :data:`MAPPING_PRESETS` (``ca``, ``backbone``, ``residue-com``).
            selection: instead of a preset, an mdtraj selection string, e.g. ``"name CA"``.
            group_by: for a selection, ``"atom"`` (one slice bead per selected atom) or
                ``"residue"`` (one centre-of-mass bead per residue, over its selected atoms).

        Raises:
            ValueError: unknown preset (the message lists the valid ones), neither or both of
                preset and selection, a selection mdtraj cannot parse or that selects nothing,
                a preset that finds no beads, a zero-mass COM group.
            TypeError: a topology of another type.
        """
        if (preset is None) == (selection is None):
            raise FlowforceError(f"give exactly one of preset (one of {', '.join(MAPPING_PRESETS)}) or selection")
        src = _Source(topology)
        if preset is not None:
            if preset not in MAPPING_PRESETS:
                raise FlowforceError(f"unknown CG mapping preset {preset!r}; valid presets: "
                                     f"{', '.join(MAPPING_PRESETS)} (or pass selection='...', an mdtraj selection "
                                     "string)")
            groups, kind = MAPPING_PRESETS[preset](src)
            if not groups:
                raise FlowforceError(f"CG mapping preset {preset!r} finds no beads in this topology (residues: "
                                     f"{', '.join(sorted({r.name for r in src.residues}))})")
            return cls._build(src, groups, kind, {"preset": preset})
        if group_by not in ("atom", "residue"):
            raise FlowforceError(f"unknown group_by {group_by!r}; valid: atom, residue")
        try:
            selected = src.mdtraj().select(selection)
        except Exception as error:  # mdtraj raises several types on bad syntax or unknown keywords
            raise FlowforceError(f"mdtraj cannot parse the selection {selection!r} "
                                 f"({type(error).__name__}: {error})") from None
        if len(selected) == 0:
            raise FlowforceError(f"the selection {selection!r} selects no atoms")
        if group_by == "atom":
            groups, kind = [[int(i)] for i in selected], "slice"
        else:
            by_residue: dict[int, list[int]] = {}
            for i in selected:
                by_residue.setdefault(src.atoms[int(i)].residue, []).append(int(i))
            groups, kind = [by_residue[r] for r in sorted(by_residue)], "com"
        return cls._build(src, groups, kind, {"selection": selection, "group_by": group_by})

    @classmethod
    def _build(cls, src: _Source, groups: list[list[int]], kind: str, source: dict[str, Any]) -> "CGMapping":
        weights, masses, names, elements, residues = [], [], [], [], []
        for g in groups:
            atoms = [src.atoms[i] for i in g]
            m = np.array([a.mass for a in atoms])
            if kind == "com":
                if m.sum() <= 0:
                    raise FlowforceError(f"the centre-of-mass group {[a.name for a in atoms]} has no mass "
                                         "(no elements?)")
                weights.append(m / m.sum())
                names.append(COM_BEAD_NAME)
                elements.append(None)
            else:
                assert len(g) == 1, "slice beads stand for one atom"
                weights.append([1.0])
                names.append(atoms[0].name)
                elements.append(atoms[0].element)
            masses.append(float(m.sum()))
            r = src.residues[atoms[0].residue]
            residues.append((r.chain, r.chain_id, r.name, r.id))
        molecule = src.molecules()
        first = [g[0] for g in groups]
        bonds = [(b - 1, b) for b in range(1, len(groups))
                 if src.atoms[first[b]].chain == src.atoms[first[b - 1]].chain
                 and molecule[first[b]] == molecule[first[b - 1]]]
        return cls(len(src.atoms), groups, weights, kind, names, elements, masses, residues, bonds, source)

    # -- shapes ----------------------------------------------------------------------------
    @property
    def n_beads(self) -> int:
        return len(self.groups)

    @property
    def type_indices(self) -> list[int]:
        """Index of every bead's type in :data:`BEAD_TYPES`."""
        return [BEAD_TYPES.index(t) for t in self.types]

    def __repr__(self) -> str:
        how = ", ".join(f"{k}={v!r}" for k, v in self.source.items())
        return f"CGMapping({how}, {self.n_atoms} atoms -> {self.n_beads} {self.kind} beads)"

    # -- maps --------------------------------------------------------------------------------
    def _apply(self, matrix: np.ndarray, values: Any, what: str) -> Any:
        if hasattr(values, "value_in_unit"):  # an OpenMM Quantity
            from openmm import unit

            values = values.value_in_unit(unit.nanometer if what == "positions"
                                          else unit.kilojoule_per_mole / unit.nanometer)
        if not type(values).__module__.startswith("torch"):
            values = np.asarray(values, dtype=np.float64)
        shape = tuple(values.shape)
        if len(shape) not in (2, 3) or shape[-2:] != (self.n_atoms, 3):
            raise FlowforceError(f"{what} must have shape (T, {self.n_atoms}, 3) or ({self.n_atoms}, 3) for this "
                                 f"{self.n_atoms}-atom mapping, got {shape}")
        if type(values).__module__.startswith("torch"):
            import torch

            m = torch.as_tensor(matrix, dtype=values.dtype, device=values.device)
            return torch.einsum("ia,...ad->...id", m, values)
        return np.einsum("ia,...ad->...id", matrix, values)

    def map_positions(self, positions: Any) -> Any:
        """Bead positions ``X_I = Σ c_Ii x_i``: ``(T, N, 3)`` or ``(N, 3)`` nm → ``(T, n, 3)`` / ``(n, 3)``.

        numpy, lists or an OpenMM Quantity in (float64 numpy out), or torch in (same dtype and
        device out; differentiable)."""
        return self._apply(self._position_matrix, positions, "positions")

    @property
    def position_matrix(self) -> np.ndarray:
        """``C``, ``(n_beads, n_atoms)``: ``X = C x`` (a copy)."""
        return self._position_matrix.copy()

    def map_forces(self, forces: Any) -> Any:
        """Bead forces ``F_I = Σ_{i∈G_I} f_i`` (summed over the mapped atoms), kJ/mol/nm;
        shapes as :meth:`map_positions`."""
        return self._apply(self._force_matrix, forces, "forces")

    # -- the CG molecule ---------------------------------------------------------------------
    def cg_topology(self) -> Any:
        """An ``openmm.app.Topology`` of the beads: chains and residues as in the source, bead
        names, elements (``None`` for COM beads: their masses are :attr:`masses`), bonds."""
        from openmm import app

        top = app.Topology()
        chains: dict[int, Any] = {}
        residues: dict[tuple[int, str, str], Any] = {}
        beads = []
        for name, symbol, (chain, chain_id, res_name, res_id) in zip(self.names, self.elements, self.residues):
            if chain not in chains:
                chains[chain] = top.addChain(chain_id)
            key = (chain, res_name, res_id)
            if key not in residues:
                residues[key] = top.addResidue(res_name, chains[chain], res_id)
            element = app.Element.getBySymbol(symbol) if symbol is not None else None
            beads.append(top.addAtom(name, element, residues[key]))
        for i, j in self.bonds:
            top.addBond(beads[i], beads[j])
        return top

    def pdb_text(self, positions_nm: Any) -> str:
        """PDB text of the beads at ``(n, 3)`` nm, with a CONECT record for every bond.

        mdtraj reads back exactly :attr:`bonds`. OpenMM's PDBFile adds its standard-residue
        template bonds as well; for the presets these coincide with :attr:`bonds`, but a
        selection that keeps, say, N, CA, C and O reads back with the template's C=O bond too.
        """
        x = np.asarray(positions_nm, dtype=np.float64)
        if x.shape != (self.n_beads, 3):
            raise FlowforceError(f"positions must have shape ({self.n_beads}, 3) nm, got {x.shape}")
        if not np.isfinite(x).all():
            raise FlowforceError("positions contain NaN or inf")
        if self.n_beads > 99999:
            raise FlowforceError(f"{self.n_beads} beads do not fit the PDB format (at most 99999)")
        out = io.StringIO()
        out.write("REMARK   1 CG MODEL WRITTEN BY OPENMM-FLOWFORCE\n")
        serial = 1
        serials = []
        chain_letters: dict[int, str] = {}
        for bead, (name, symbol, (chain, chain_id, res_name, res_id)) in enumerate(
                zip(self.names, self.elements, self.residues)):
            fallback = chr(ord("A") + len(chain_letters) % 26)
            letter = chain_letters.setdefault(chain, chain_id if len(chain_id) == 1 else fallback)
            if bead > 0 and self.residues[bead - 1][0] != chain:
                out.write(f"TER   {serial:5d}      {self.residues[bead - 1][2][:3]:>3s} "
                          f"{chain_letters[self.residues[bead - 1][0]]}{self.residues[bead - 1][3][-4:]:>4s}\n")
                serial += 1
            padded = f" {name:<3s}" if len(name) < 4 else name[:4]
            x0, y0, z0 = x[bead] * 10.0
            out.write(f"HETATM{serial:5d} {padded:4s} {res_name[:3]:>3s} {letter}{res_id[-4:]:>4s}    "
                      f"{x0:8.3f}{y0:8.3f}{z0:8.3f}  1.00  0.00          {(symbol or '').upper():>2s}  \n")
            serials.append(serial)
            serial += 1
        neighbours: dict[int, list[int]] = {}
        for i, j in self.bonds:
            neighbours.setdefault(i, []).append(j)
            neighbours.setdefault(j, []).append(i)
        for i in sorted(neighbours):
            for k in range(0, len(neighbours[i]), 4):
                out.write(f"CONECT{serials[i]:5d}" + "".join(f"{serials[j]:5d}" for j in neighbours[i][k:k + 4]) + "\n")
        out.write("END\n")
        return out.getvalue()

    def write_pdb(self, path: str | os.PathLike, positions_nm: Any) -> None:
        """Write :meth:`pdb_text` atomically to ``path``."""
        atomic_write_bytes(path, self.pdb_text(positions_nm).encode())

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, str, float, int) for model files; :meth:`from_dict` inverts it."""
        return {"format": MAPPING_FORMAT, "n_atoms": self.n_atoms, "kind": self.kind,
                "groups": [list(g) for g in self.groups], "weights": [list(w) for w in self.weights],
                "names": list(self.names), "elements": list(self.elements), "masses": self.masses.tolist(),
                "residues": [list(r) for r in self.residues], "bonds": [list(b) for b in self.bonds],
                "source": dict(self.source), "types": list(self.types)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CGMapping":
        """Inverse of :meth:`to_dict`.

        Dicts written before bead types existed (no ``types``) load with the types of :func:`bead_type`.

        Raises:
            ValueError: another format tag, or missing or unknown keys (named)."""
        keys = {"format", "n_atoms", "kind", "groups", "weights", "names", "elements", "masses", "residues",
                "bonds", "source"}
        missing, unknown = sorted(keys - set(data)), sorted(set(data) - keys - {"types"})
        if missing or unknown:
            raise FlowforceError(f"not a CG mapping dict: missing keys {missing}, unknown keys {unknown}")
        if data["format"] != MAPPING_FORMAT:
            raise FlowforceError(f"CG mapping format {data['format']!r} is not {MAPPING_FORMAT!r}")
        return cls(data["n_atoms"], data["groups"], data["weights"], data["kind"], data["names"], data["elements"],
                   data["masses"], data["residues"], data["bonds"], data["source"], data.get("types"))
