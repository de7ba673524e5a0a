r"""Structural order parameters of a protein against its folded structure: the fraction of
native contacts Q and the Cα-RMSD after optimal superposition.

Fraction of native contacts (Best, Hummer, Eaton, "Native contacts determine protein folding
mechanisms in atomistic simulations", PNAS 110, 17874 (2013), doi:10.1073/pnas.1311599110):

    Q(X) = (1/N) Σ_{(i,j) ∈ native} 1 / (1 + exp(β (r_ij(X) − λ r⁰_ij))),

with r⁰_ij the distance in the folded structure, β = 50 nm⁻¹ (5 Å⁻¹) and λ the tolerance
for fluctuations. Native pairs are chosen in the folded structure; two definitions, looked up
in :data:`CONTACT_DEFINITIONS`:

* ``heavy-atom`` (the paper's all-atom definition): heavy atoms i, j of residues more than
  3 apart in sequence (|res_i − res_j| > 3) closer than 0.45 nm; λ = 1.8.
* ``ca`` (one bead per residue, CG models): Cα pairs more than 3 residues apart closer than
  0.8 nm; λ = 1.5, the smaller tolerance BHE use for coarse-grained models (a Cα pair
  fluctuates relatively less than two side-chain atoms). 0.8 nm rather than 0.45 nm because
  Cα atoms of residues in contact sit ~0.5–0.7 nm apart (across a β-hairpin, ~0.45–0.55 nm
  for hydrogen-bonded pairs, ~0.55–0.65 nm for the others), so a heavy-atom cutoff would
  miss most cross-strand pairs.

At the folded structure every term is 1/(1 + exp(−β r⁰ (λ − 1))), which is 1 − 6·10⁻⁵ for a Cα pair
at 0.39 nm (the closest cross-strand pair of a hairpin) and closer to 1 for longer pairs and
for heavy atoms (λ = 1.8), so Q(native) = 1 to four digits.

Cα-RMSD (:func:`ca_rmsd`): the root mean square deviation after removing the centres and the
optimal proper rotation (Kabsch, Acta Cryst. A32, 922 (1976); reflections excluded by the sign
of the determinant, so a mirror image has a non-zero RMSD), in nm.

Positions are nm everywhere, ``(T, n, 3)`` for trajectories and ``(n, 3)`` for one structure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import FlowforceError

__all__ = ["CONTACT_DEFINITIONS", "ContactDefinition", "NativeContacts", "ca_indices", "ca_rmsd",
           "fraction_native_contacts", "heavy_atom_indices", "kabsch_rmsd", "native_contacts"]

#: β of BHE 2013, nm⁻¹ (5 Å⁻¹).
BETA_PER_NM = 50.0


@dataclass(frozen=True)
class ContactDefinition:
    """Which pairs of the folded structure are native contacts, and Q's tolerance λ.

    Attributes:
        cutoff_nm: a pair is native when closer than this in the folded structure.
        min_separation: residues must be more than this many apart in sequence.
        tolerance: λ (dimensionless).
        atoms: what the positions hold: ``"heavy"`` atoms or ``"ca"`` beads.
    """

    cutoff_nm: float
    min_separation: int
    tolerance: float
    atoms: str


#: Contact definition name → :class:`ContactDefinition` (module docstring).
CONTACT_DEFINITIONS: dict[str, ContactDefinition] = {
    "heavy-atom": ContactDefinition(cutoff_nm=0.45, min_separation=3, tolerance=1.8, atoms="heavy"),
    "ca": ContactDefinition(cutoff_nm=0.8, min_separation=3, tolerance=1.5, atoms="ca"),
}


@dataclass(frozen=True)
class NativeContacts:
    """Native pairs of a folded structure.

    Attributes:
        pairs: ``(N, 2)`` indices into the positions Q is evaluated on.
        distances_nm: ``(N,)`` r⁰ of each pair in the folded structure.
        definition: the name in :data:`CONTACT_DEFINITIONS`.
    """

    pairs: np.ndarray
    distances_nm: np.ndarray
    definition: str

    @property
    def n_contacts(self) -> int:
        return int(len(self.pairs))


def _positions(x: Any, name: str, single: bool = False) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    want = 2 if single else 3
    if a.ndim != want or a.shape[-1] != 3:
        shape = "(n, 3)" if single else "(T, n, 3)"
        raise FlowforceError(f"{name} must have shape {shape} nm, got {a.shape}")
    if not np.isfinite(a).all():
        raise FlowforceError(f"{name} contain NaN or inf; drop those frames")
    return a


def heavy_atom_indices(topology: Any) -> np.ndarray:
    """Indices of the atoms of an ``openmm.app.Topology`` that are not hydrogen (by element, or by a
    name starting with H when the element is unknown)."""
    heavy = []
    for atom in topology.atoms():
        symbol = atom.element.symbol if atom.element is not None else atom.name.lstrip("0123456789")[:1]
        if symbol not in ("H", "D"):
            heavy.append(atom.index)
    return np.asarray(heavy, dtype=np.int64)


def ca_indices(topology: Any) -> np.ndarray:
    """Indices of the atoms (or beads) named ``CA`` of an ``openmm.app.Topology``, in order.

    Works for all-atom topologies and for CG topologies made with the ``ca`` or ``backbone``
    mappings (their beads keep the atom names)."""
    return np.asarray([a.index for a in topology.atoms() if a.name == "CA"], dtype=np.int64)


def _residue_of(topology: Any) -> np.ndarray:
    return np.asarray([a.residue.index for a in topology.atoms()], dtype=np.int64)


def native_contacts(folded: Any, residue_index: Sequence[int], definition: str = "ca") -> NativeContacts:
    """Native contacts of a folded structure.

    Args:
        folded: ``(n, 3)`` nm, the positions Q will be evaluated on (heavy atoms or Cα beads).
        residue_index: ``(n,)`` the residue of each position (sequence order).
        definition: a name in :data:`CONTACT_DEFINITIONS`.

    Raises:
        FlowforceError: an unknown definition (listing the valid ones), mismatched lengths, or
            no pair meets the definition (the structure is not folded, or not compact).
    """
    if definition not in CONTACT_DEFINITIONS:
        raise FlowforceError(f"unknown contact definition {definition!r}; valid: {', '.join(CONTACT_DEFINITIONS)}")
    spec = CONTACT_DEFINITIONS[definition]
    x = _positions(folded, "the folded structure", single=True)
    residues = np.asarray(residue_index, dtype=np.int64)
    if residues.shape != (len(x),):
        raise FlowforceError(f"residue_index has shape {residues.shape} but the folded structure has {len(x)} positions")
    i, j = np.triu_indices(len(x), k=1)
    r0 = np.linalg.norm(x[i] - x[j], axis=-1)
    native = (np.abs(residues[i] - residues[j]) > spec.min_separation) & (r0 < spec.cutoff_nm)
    if not native.any():
        raise FlowforceError(f"the folded structure has no native contacts ({definition}: pairs more than "
                             f"{spec.min_separation} residues apart closer than {spec.cutoff_nm} nm); give the "
                             "folded (compact) structure, not an extended one")
    return NativeContacts(np.stack([i[native], j[native]], axis=1), r0[native], definition)


def fraction_native_contacts(positions: Any, contacts: NativeContacts, beta_per_nm: float = BETA_PER_NM) -> np.ndarray:
    """Q of every frame (module docstring), ``(T, n, 3)`` nm → ``(T,)`` in [0, 1]."""
    x = _positions(positions, "positions")
    if contacts.pairs.max() >= x.shape[1]:
        raise FlowforceError(f"the native contacts name position {int(contacts.pairs.max())} but the frames have "
                             f"{x.shape[1]}; the frames and the folded structure are different selections")
    r = np.linalg.norm(x[:, contacts.pairs[:, 0]] - x[:, contacts.pairs[:, 1]], axis=-1)
    lam = CONTACT_DEFINITIONS[contacts.definition].tolerance
    # exp overflows harmlessly to inf (the term is then 0); errstate keeps numpy quiet about it.
    with np.errstate(over="ignore"):
        return np.mean(1.0 / (1.0 + np.exp(beta_per_nm * (r - lam * contacts.distances_nm))), axis=1)


def kabsch_rmsd(positions: Any, reference: Any) -> np.ndarray:
    """RMSD after optimal superposition (translation and proper rotation), ``(T, n, 3)`` and
    ``(n, 3)`` nm → ``(T,)`` nm, equal weights (Kabsch 1976)."""
    x = _positions(positions, "positions")
    ref = _positions(reference, "the reference structure", single=True)
    if x.shape[1] != len(ref):
        raise FlowforceError(f"the frames have {x.shape[1]} positions but the reference structure {len(ref)}")
    x = x - x.mean(axis=1, keepdims=True)
    ref = ref - ref.mean(axis=0)
    covariance = np.einsum("tni,nj->tij", x, ref)
    u, s, vt = np.linalg.svd(covariance)
    # A reflection would lower the RMSD of a mirror image; flip the smallest singular direction instead.
    sign = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    s[:, -1] *= np.where(sign == 0, 1.0, sign)
    squared = (x ** 2).sum((1, 2)) + (ref ** 2).sum() - 2.0 * s.sum(axis=1)
    return np.sqrt(np.maximum(squared, 0.0) / len(ref))


def ca_rmsd(positions: Any, folded: Any) -> np.ndarray:
    """Cα-RMSD to the folded structure in nm: :func:`kabsch_rmsd` of Cα positions ``(T, n_res, 3)``."""
    return kabsch_rmsd(positions, folded)


def residues_of(topology: Any, indices: np.ndarray) -> np.ndarray:
    """Residue index (sequence order) of the given atoms of a topology."""
    return _residue_of(topology)[indices]
