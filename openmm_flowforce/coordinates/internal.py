r"""Internal coordinates of one molecule, normalised to the unit cube, with exact ``ladj``.

Where the unit-cube normalisation happens (see :mod:`openmm_flowforce.conventions`): here,
in :meth:`InternalCoordinates.to_unit`. Its output ``u`` has ``dim = 3N − 6`` entries ordered
``[bonds (N−1), angles (N−2), torsions (N−3)]``, the torsion entries periodic on ``[0, 1)``.

The map x → u, per Z-matrix row ``(i, j, k, l)`` (see :mod:`.zmatrix`):

* bond ``b = |x_i − x_j|`` (nm) → ``u = Φ((b − m_b)/s_b)``;
* angle ``θ = ∠(i, j, k) ∈ [0, π]`` → ``w = cos θ`` → ``u = Φ((w − m_w)/s_w)``;
* torsion ``φ = dihedral(i, j, k, l) ∈ [−π, π)`` → ``u = (φ + π)/(2π)``, a circle; except
  torsions whose data all stay within ±π/2 of their circular mean μ with a spread below
  0.35 rad (found by
  :meth:`InternalCoordinates.fit`; e.g. a second methyl hydrogen placed relative to the
  first, or a chiral centre's substituent), which become interval coordinates
  ``u = Φ(wrap(φ − μ)/s_φ)``: a circle coordinate would make the flow model a peak a few
  degrees wide, which is a stiff potential in Cartesian space. Their map is smooth except
  at the antipode φ = μ + π, where the density is negligible (−log Φ' = (π/s_φ)²/2);

with Φ the standard normal CDF and ``m, s`` buffers (mean and standard deviation) set by
:meth:`InternalCoordinates.fit`. Why Φ: with an identity flow the density is then a
product of Gaussians in bond lengths and cos θ, i.e. exactly harmonic like a force field's
bonds and angles, and outside the data the confinement −log Φ'(z) = z²/2 grows
quadratically: finite and smooth for every finite input. (A logistic map, tried first,
gave a potential so anharmonic at the thermal scale that Verlet at 1 fs drifted four
times more than Amber.) In float32, Φ(z) rounds to 1 beyond z ≈ 5.4 and to 0 below
z ≈ −13; the log-determinant uses the analytic log Φ'(z) and stays exact there.

Volume element. Place atom 0 anywhere (d³x₀: translation), atom 1 in spherical coordinates
about atom 0, atom 2 about atom 1 with its azimuth γ around the 0–1 axis, atoms ≥ 3 by
(bond, angle, torsion):

    d^{3N}x = d³x₀ · (sin α dα dβ dγ) · b₁² db₁ · b₂² sin θ₂ db₂ dθ₂ · Π_{i≥3} b_i² sin θ_i db_i dθ_i dφ_i.

``sin α dα dβ dγ`` is the Haar measure of the rotation (α, β: direction of the 0–1 bond;
γ: the spin about it). Factoring out the six rigid-body degrees of freedom leaves the
Jacobian ``J = b₁² · Π_{i≥2} b_i² sin θ_i``, so x → (b, θ, φ) has
``ladj = −[2 log b₁ + Σ_{i≥2} (2 log b_i + log sin θ_i)]``. Adding the elementwise
``log|du/d(b, θ, φ)|``: bonds ``log Φ'(z) − log s_b``, angles
``log Φ'(z) − log s_w + log sin θ`` (from dw/dθ = −sin θ), periodic torsions ``−log 2π`` (narrow ones ``log Φ'(z_φ) − log s_φ``), the
``log sin θ`` terms cancel and

    ladj(x → u) = Σ_bonds [log Φ'(z_b) − log s_b − 2 log b] + Σ_angles [log Φ'(z_w) − log s_w]
                  − (N − 3) log 2π,      log Φ'(z) = −z²/2 − ½ log 2π,

which is what is computed: no ``log sin θ`` is ever evaluated, so densities and energies
stay finite at linear angles (θ = π). The torsion itself is undefined there (and its
gradient NaN); this is a measure-zero set the coordinates cannot avoid.

Reference for the construction: Noé, Olsson, Köhler, Wu, "Boltzmann generators", Science
365 (2019), arXiv:1812.01729 (mixed/internal-coordinate transform); NeRF placement:
Parsons et al., J. Comput. Chem. 26, 1063 (2005).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..conventions import wrap_torsion
from .zmatrix import ZMatrix, build_zmatrix
from ..errors import FlowforceError

__all__ = ["InternalCoordinates"]

#: Single-bond covalent radii in nm (Cordero et al., Dalton Trans. 2008); default bond centre
#: is the sum of the two radii. Unlisted elements use :data:`FALLBACK_RADIUS_NM`.
COVALENT_RADIUS_NM = {
    "H": 0.031, "D": 0.031, "C": 0.076, "N": 0.071, "O": 0.066, "F": 0.057, "P": 0.107,
    "S": 0.105, "Cl": 0.102, "Br": 0.120, "I": 0.139, "Se": 0.120, "B": 0.084, "Si": 0.111,
}
FALLBACK_RADIUS_NM = 0.075
#: A torsion whose data all stay within this of their circular mean, with a standard
#: deviation below NARROW_TORSION_MAX_SCALE, is modelled as an interval coordinate (normal
#: CDF of the wrapped deviation) rather than a circle. Broad torsions (backbone φ/ψ, free
#: rotors) stay circles even when the data visit one basin only.
NARROW_TORSION_RAD = math.pi / 2
NARROW_TORSION_MAX_SCALE = 0.35
#: Floor on the scale of a narrow torsion (rad).
MIN_TORSION_SCALE = 1e-2
DEFAULT_BOND_SCALE_NM = 0.005
#: Default angle normalisation: centred on cos(112°), between tetrahedral and trigonal.
DEFAULT_COS_LOC = math.cos(math.radians(112.0))
DEFAULT_COS_SCALE = 0.1
#: Floors on fitted scales, so constrained bonds (std 0) stay invertible.
MIN_BOND_SCALE_NM = 1e-3
MIN_COS_SCALE = 1e-2
#: Sampled bonds are clamped to at least this (nm) in :meth:`InternalCoordinates.from_unit`.
MIN_BOND_NM = 1e-4
#: A median bonded distance above this (nm) means the positions are in Ångström.
ANGSTROM_SUSPECT_NM = 0.5


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def _cos_angle(x: Tensor, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
    """cos of the angle i–j–k, ``(B, M)``."""
    a, c = x[:, i] - x[:, j], x[:, k] - x[:, j]
    return (a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1))


def _torsion(x: Tensor, i: Tensor, j: Tensor, k: Tensor, l: Tensor) -> Tensor:
    """IUPAC dihedral i–j–k–l in [−π, π) (same sign convention as mdtraj), ``(B, M)``."""
    b0, b1, b2 = x[:, i] - x[:, j], x[:, k] - x[:, j], x[:, l] - x[:, k]
    axis = _unit(b1)
    v = b0 - (b0 * axis).sum(-1, keepdim=True) * axis
    w = b2 - (b2 * axis).sum(-1, keepdim=True) * axis
    return wrap_torsion(torch.atan2((torch.cross(axis, v, dim=-1) * w).sum(-1), (v * w).sum(-1)))


def _log_dnormal_cdf(z: Tensor) -> Tensor:
    """log φ(z) = log dΦ/dz for the standard normal CDF Φ: exact, never underflows."""
    return -0.5 * z * z - 0.5 * math.log(2.0 * math.pi)


def _topology_graph(topology: Any) -> tuple[int, list[tuple[int, int]], list[str | None], list[str]]:
    """(n_atoms, bonds, element symbols, labels) of an OpenMM or mdtraj topology."""
    module, name = type(topology).__module__, type(topology).__qualname__
    kind = f"{module}.{name}"
    if name == "Topology" and module.startswith(("openmm.app", "simtk.openmm.app")):
        atoms = list(topology.atoms())
        bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    elif name == "Topology" and module.startswith("mdtraj"):
        atoms = list(topology.atoms)
        bonds = [(b[0].index, b[1].index) for b in topology.bonds]
    else:
        raise TypeError(
            f"topology must be an openmm.app.Topology or an mdtraj.Topology, got {kind}; "
            "for a trajectory pass traj.topology, for a PDBFile pass pdb.topology"
        )
    elements = [a.element.symbol if a.element is not None else None for a in atoms]
    labels = [f"{a.residue.name}{a.residue.index + 1}:{a.name}" for a in atoms]
    return len(atoms), bonds, elements, labels


def _positions_as_tensor(positions: Any) -> Tensor:
    """numpy / torch / openmm Quantity (T, N, 3) or (N, 3), nm → float64 tensor (T, N, 3)."""
    if hasattr(positions, "value_in_unit"):
        from openmm import unit

        positions = positions.value_in_unit(unit.nanometer)
    x = torch.as_tensor(np.asarray(positions) if not isinstance(positions, Tensor) else positions)
    x = x.detach().to(torch.float64)
    return x[None] if x.ndim == 2 else x


def _index_after_load(module: "InternalCoordinates", incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook (a module-level function, so the model still pickles)."""
    module._index_narrow_torsions()


class InternalCoordinates(nn.Module):
    """Bond/angle/torsion coordinates of one connected molecule, built from its bond graph.

    Build with :meth:`from_topology`. Buffers (saved in ``state_dict``): ``rows`` (the
    Z-matrix, ``(N, 4)`` int64), ``bond_loc``/``bond_scale`` ``(N−1,)`` nm,
    ``cos_loc``/``cos_scale`` ``(N−2,)`` and the torsion buffers ``torsion_periodic``
    (bool), ``torsion_loc``/``torsion_scale`` ``(N−3,)``. Which torsions are narrow is
    decided once, when ``torsion_periodic`` is set (:meth:`fit`,
    :meth:`set_periodic_torsions`, loading a state dict), and kept as the index buffer
    ``narrow_torsions`` (int64, not saved: derived), so the maps have no data-dependent
    branch or boolean-mask indexing and ``torch.compile``/``torch.export`` trace them
    without graph breaks. Maps accept float32 or float64 and use torch ops only, so
    gradients (and double backward, for forces of a trained potential) flow.

    Args:
        zmatrix: placement order and references, from :func:`.zmatrix.build_zmatrix`.
        elements: element symbol per atom, for the default bond normalisation.
    """

    rows: Tensor
    torsion_periodic: Tensor
    narrow_torsions: Tensor
    torsion_loc: Tensor
    torsion_scale: Tensor
    bond_loc: Tensor
    bond_scale: Tensor
    cos_loc: Tensor
    cos_scale: Tensor

    def __init__(self, zmatrix: ZMatrix, elements: Sequence[str | None] | None = None):
        super().__init__()
        rows = torch.as_tensor(zmatrix.rows, dtype=torch.long)
        n = rows.shape[0]
        if elements is not None and len(elements) != n:
            raise FlowforceError(f"got {len(elements)} element symbols for a {n}-atom Z-matrix")
        radius = [COVALENT_RADIUS_NM.get(e or "", FALLBACK_RADIUS_NM) for e in (elements or [None] * n)]
        bond_loc = [radius[i] + radius[j] for i, j in zmatrix.rows[1:, :2].tolist()]
        self.register_buffer("rows", rows)
        self.register_buffer("bond_loc", torch.tensor(bond_loc, dtype=torch.float64))
        self.register_buffer("bond_scale", torch.full((n - 1,), DEFAULT_BOND_SCALE_NM, dtype=torch.float64))
        self.register_buffer("cos_loc", torch.full((n - 2,), DEFAULT_COS_LOC, dtype=torch.float64))
        self.register_buffer("cos_scale", torch.full((n - 2,), DEFAULT_COS_SCALE, dtype=torch.float64))
        # Torsions are circles until fit() finds one that stays near its mean (module docstring).
        self.register_buffer("torsion_periodic", torch.ones(n - 3, dtype=torch.bool))
        self.register_buffer("torsion_loc", torch.zeros(n - 3, dtype=torch.float64))
        self.register_buffer("torsion_scale", torch.ones(n - 3, dtype=torch.float64))
        self.register_buffer("narrow_torsions", torch.zeros(0, dtype=torch.long), persistent=False)
        # Checkpoints store torsion_periodic only (older ones predate narrow_torsions):
        # derive the index whenever a state dict is loaded.
        self.register_load_state_dict_post_hook(_index_after_load)

    def _index_narrow_torsions(self) -> None:
        """Set ``narrow_torsions`` from ``torsion_periodic`` (call after every change to it)."""
        index = torch.nonzero(~self.torsion_periodic.cpu()).flatten()
        self.narrow_torsions = index.to(self.torsion_periodic.device)

    @classmethod
    def from_topology(cls, topology: Any, positions: Any = None) -> "InternalCoordinates":
        """Internal coordinates for the molecule of an OpenMM or mdtraj topology.

        Args:
            topology: ``openmm.app.Topology`` or ``mdtraj.Topology`` of one connected molecule.
            positions: optional ``(T, N, 3)`` or ``(N, 3)`` nm (numpy, torch or an OpenMM
                Quantity) to :meth:`fit` the normalisation; ``None`` keeps physics defaults
                (bonds centred on the sum of covalent radii, scale 0.005 nm; cos θ centred on
                cos 112°, scale 0.1).

        Raises:
            TypeError: for any other topology type.
            ValueError: if the bond graph is disconnected (message names the fragments), or
                the positions are invalid (see :meth:`fit`).
        """
        n_atoms, bonds, elements, labels = _topology_graph(topology)
        ic = cls(build_zmatrix(n_atoms, bonds, elements=elements, labels=labels), elements=elements)
        if positions is not None:
            ic.fit(positions)
        return ic

    # -- shape information -------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return int(self.rows.shape[0])

    @property
    def dim(self) -> int:
        """3N − 6: (N−1) bonds + (N−2) angles + (N−3) torsions."""
        return 3 * self.n_atoms - 6

    @property
    def periodic(self) -> list[bool]:
        """Per entry of ``u``: True for the torsions that are circles (of the last N−3)."""
        return [False] * (2 * self.n_atoms - 3) + [bool(p) for p in self.torsion_periodic.tolist()]

    def set_periodic_torsions(self, periodic: Sequence[bool]) -> None:
        """Declare which torsions are circles (used when rebuilding a saved model)."""
        self.torsion_periodic.copy_(torch.as_tensor([bool(p) for p in periodic], dtype=torch.bool))
        self._index_narrow_torsions()

    @property
    def zmatrix(self) -> ZMatrix:
        return ZMatrix(rows=self.rows.cpu().numpy().copy())

    # -- normalisation -----------------------------------------------------------------
    @torch.no_grad()
    def fit(self, positions: Any, min_bond_scale: float = MIN_BOND_SCALE_NM,
            min_cos_scale: float = MIN_COS_SCALE) -> "InternalCoordinates":
        """Set ``m, s`` to the mean and standard deviation (floored) of bonds and cos θ.

        Args:
            positions: ``(T, N, 3)`` or ``(N, 3)`` in nm (numpy, torch or OpenMM Quantity).
            min_bond_scale: floor on the bond scale (nm).
            min_cos_scale: floor on the cos θ scale.

        Returns:
            self, so ``InternalCoordinates.from_topology(top).fit(x)`` chains.
        """
        x = _positions_as_tensor(positions).to(self.bond_loc.device)
        self._check_shape(x)
        bonds = self._bonds(x)
        self._check(x, bonds)
        cos = _cos_angle(x, *self.rows[2:, :3].T)
        self.bond_loc.copy_(bonds.mean(0))
        self.bond_scale.copy_(bonds.std(0, unbiased=False).clamp_min(min_bond_scale))
        self.cos_loc.copy_(cos.mean(0))
        self.cos_scale.copy_(cos.std(0, unbiased=False).clamp_min(min_cos_scale))
        torsions = _torsion(x, *self.rows[3:].T)
        centre = torch.atan2(torch.sin(torsions).mean(0), torch.cos(torsions).mean(0))
        delta = wrap_torsion(torsions - centre)
        spread = delta.std(0, unbiased=False)
        self.torsion_periodic.copy_((delta.abs().amax(0) >= NARROW_TORSION_RAD) | (spread > NARROW_TORSION_MAX_SCALE))
        self.torsion_loc.copy_(wrap_torsion(centre + delta.mean(0)))
        self.torsion_scale.copy_(spread.clamp_min(MIN_TORSION_SCALE))
        self._index_narrow_torsions()
        return self

    # -- validation --------------------------------------------------------------------
    def _check_shape(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"positions must be a torch.Tensor (B, N, 3) in nm, got {type(x).__name__}; "
                            "convert with torch.as_tensor(x)")
        if not x.is_floating_point():
            raise FlowforceError(f"positions must be float32 or float64, got {x.dtype}")
        n = self.n_atoms
        if x.ndim != 3 or x.shape[-1] != 3 or x.shape[1] != n:
            hint = ("add a batch dimension: x[None]" if x.shape == (n, 3) else
                    f"the topology has {n} atoms: pass positions of exactly its atoms "
                    "(select the same atoms, e.g. traj.atom_slice(...), before converting)")
            raise FlowforceError(f"expected positions of shape (B, {n}, 3) in nm, got {tuple(x.shape)}; {hint}")

    def _check(self, x: Tensor, bonds: Tensor) -> None:
        """Non-finite values and Ångström positions (data-dependent: syncs with the device)."""
        finite = torch.isfinite(x).all(-1)
        if not bool(finite.all()):
            frame, atom = (int(v) for v in torch.nonzero(~finite)[0])
            raise FlowforceError(
                f"positions contain NaN or inf (first at frame {frame}, atom {atom}, "
                f"{int((~finite).sum())} atoms in all); remove those frames, or check the "
                "simulation that produced them (it may have blown up)"
            )
        median = float(bonds.detach().median())
        if median > ANGSTROM_SUSPECT_NM:
            raise FlowforceError(
                f"the median bonded distance is {median:.3f}, but bonds are ~0.1-0.15 nm: "
                "positions look like Ångström; OpenMM uses nm: divide by 10 (if they are nm, "
                "the molecule is split across the periodic box: make it whole first, e.g. "
                "mdtraj's traj.image_molecules())"
            )

    # -- the maps ----------------------------------------------------------------------
    def _bonds(self, x: Tensor) -> Tensor:
        return (x[:, self.rows[1:, 0]] - x[:, self.rows[1:, 1]]).norm(dim=-1)

    def to_internal(self, x: Tensor, check: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Bonds, angles and torsions in Z-matrix row order.

        Args:
            x: ``(B, N, 3)`` positions in nm.
            check: validate values (NaN, Ångström); costs a device sync. Shapes are
                always checked.

        Returns:
            bonds ``(B, N−1)`` nm, angles ``(B, N−2)`` in [0, π], torsions ``(B, N−3)`` in
            [−π, π), all in x's dtype.
        """
        self._check_shape(x)
        bonds = self._bonds(x)
        if check:
            self._check(x, bonds)
        r = self.rows
        a, c = x[:, r[2:, 0]] - x[:, r[2:, 1]], x[:, r[2:, 2]] - x[:, r[2:, 1]]
        angles = torch.atan2(torch.cross(a, c, dim=-1).norm(dim=-1), (a * c).sum(-1))
        torsions = _torsion(x, *r[3:].T)
        return bonds, angles, torsions

    def _torsion_z(self, torsions: Tensor) -> Tensor:
        """Standardised deviation of each torsion from its centre (used for narrow torsions)."""
        dtype = torsions.dtype
        return wrap_torsion(torsions - self.torsion_loc.to(dtype)) / self.torsion_scale.to(dtype)

    def _ladj(self, bonds: Tensor, cos: Tensor, torsions: Tensor) -> Tensor:
        """ladj(x → u) from bonds, cos θ and torsions (module docstring); ``(B,)``."""
        dtype = bonds.dtype
        zb = (bonds - self.bond_loc.to(dtype)) / self.bond_scale.to(dtype)
        zw = (cos - self.cos_loc.to(dtype)) / self.cos_scale.to(dtype)
        narrow = self.narrow_torsions
        ladj = (_log_dnormal_cdf(zb) - 2.0 * torch.log(bonds)).sum(-1) + _log_dnormal_cdf(zw).sum(-1)
        # A shape, not a value: decided when the torsions were classified, so no device sync
        # and no graph break. Only with narrow torsions may ladj depend on torsions (which
        # are undefined at linear angles).
        if narrow.numel() > 0:
            loc, scale = self.torsion_loc.index_select(0, narrow), self.torsion_scale.index_select(0, narrow)
            z = wrap_torsion(torsions.index_select(-1, narrow) - loc.to(dtype)) / scale.to(dtype)
            ladj = ladj + _log_dnormal_cdf(z).sum(-1)
        # The count as a float64 tensor op: an int would be a traced int tensor (rounded
        # through the default dtype) under torch.jit.trace but exact in eager mode.
        n_periodic = self.torsion_periodic.to(torch.float64).sum()
        const = -(self.bond_scale.log().sum() + self.cos_scale.log().sum()
                  + self.torsion_scale.index_select(0, narrow).log().sum() + n_periodic * math.log(2.0 * math.pi))
        return ladj + const.to(dtype)

    def to_unit(self, x: Tensor, check: bool = True) -> tuple[Tensor, Tensor]:
        """Cartesian positions → unit cube, with the exact log-determinant.

        Args:
            x: ``(B, N, 3)`` positions in nm, float32 or float64.
            check: validate values (NaN, Ångström); costs a device sync.

        Returns:
            u ``(B, 3N−6)`` ordered [bonds, angles, torsions] (torsions periodic on [0, 1)),
            and ``ladj`` ``(B,)``: log|det du/dx| with the six rigid-body degrees of freedom
            factored out (module docstring). Invariant under rotations and translations.

        Raises:
            ValueError: wrong shape or atom count, non-finite values, Ångström positions.
        """
        self._check_shape(x)
        bonds = self._bonds(x)
        if check:
            self._check(x, bonds)
        dtype = x.dtype
        r = self.rows
        cos = _cos_angle(x, *r[2:, :3].T)
        torsions = _torsion(x, *r[3:].T)
        ub = torch.special.ndtr((bonds - self.bond_loc.to(dtype)) / self.bond_scale.to(dtype))
        uw = torch.special.ndtr((cos - self.cos_loc.to(dtype)) / self.cos_scale.to(dtype))
        ut = torch.where(self.torsion_periodic, (torsions + math.pi) / (2.0 * math.pi),
                         torch.special.ndtr(self._torsion_z(torsions)))
        return torch.cat([ub, uw, ut], dim=-1), self._ladj(bonds, cos, torsions)

    def from_unit(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Unit cube → Cartesian positions in the canonical frame, with log-determinant.

        Canonical frame: the root (row 0) at the origin, row 1 on +z, row 2 in the xz plane
        with x ≥ 0; later atoms by NeRF placement (Parsons et al. 2005), vectorised over
        atoms whose references are already placed.

        Sampled values outside the physical range are clamped: u to (0, 1) before the
        inverse CDF, bonds to ≥ 1e-4 nm, cos θ to [−1, 1]; where a clamp is active the map is not
        invertible and its gradient there is zero. Torsions need no clamp (periodic).

        Args:
            u: ``(B, 3N−6)`` ordered [bonds, angles, torsions].

        Returns:
            x ``(B, N, 3)`` in nm, and ``ladj`` ``(B,)`` = −(ladj of :meth:`to_unit` at x),
            so the two are consistent (and the rigid-body degrees of freedom are excluded).
        """
        n = self.n_atoms
        if not isinstance(u, Tensor) or u.ndim != 2 or u.shape[1] != self.dim:
            shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise FlowforceError(f"expected u of shape (B, {self.dim}) (3N − 6 for N = {n} atoms), got {shape}")
        dtype = u.dtype
        finfo = torch.finfo(dtype)
        z = torch.special.ndtri(u[:, : 2 * n - 3].clamp(finfo.tiny, 1.0 - finfo.eps))
        bonds = (self.bond_loc.to(dtype) + self.bond_scale.to(dtype) * z[:, : n - 1]).clamp_min(MIN_BOND_NM)
        cos = (self.cos_loc.to(dtype) + self.cos_scale.to(dtype) * z[:, n - 1:]).clamp(-1.0, 1.0)
        # clamp_min keeps d sqrt finite (and zero through the clamp) at cos = ±1.
        sin = (1.0 - cos * cos).clamp_min(finfo.tiny).sqrt()
        ut = u[:, 2 * n - 3:]
        narrow = self.torsion_loc.to(dtype) + self.torsion_scale.to(dtype) * torch.special.ndtri(
            ut.clamp(finfo.tiny, 1.0 - finfo.eps))
        phi = torch.where(self.torsion_periodic, 2.0 * math.pi * ut - math.pi, wrap_torsion(narrow))
        return self._place(bonds, cos, sin, phi), -self._ladj(bonds, cos, phi)

    # -- standardised internal coordinates (the HMC space of FAB) ----------------------
    def _scale_log_sum(self) -> Tensor:
        """Σ log s over the bond, cos θ and narrow-torsion scales (float64, 0-d)."""
        narrow = self.narrow_torsions
        return (self.bond_scale.log().sum() + self.cos_scale.log().sum()
                + self.torsion_scale.index_select(0, narrow).log().sum())

    def to_standard(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian positions → standardised internal coordinates ``z``, with log|det dz/dx|.

        ``z = [(b − m_b)/s_b, (cos θ − m_w)/s_w, t]`` with ``t`` the torsion φ in radians
        for circles and ``wrap(φ − μ)/s_φ`` for narrow torsions: the argument of Φ in
        :meth:`to_unit` before Φ is applied, and φ itself on circles. Every entry has about
        unit thermal spread under the force-field normalisation of
        :func:`~openmm_flowforce.samplers.molecule_flow.prior_internal_coordinates`, and no
        entry is bounded by the map (the physical range is checked by :meth:`from_standard`),
        so HMC needs no boundaries. ``to_unit = standard_to_unit ∘ to_standard``, and the
        two log-determinants add up to :meth:`to_unit`'s.

        Returns:
            z ``(B, 3N−6)`` and ``ladj`` ``(B,)`` = ``−Σ 2 log b − Σ log s`` (rigid-body
            degrees of freedom factored out, as in :meth:`to_unit`).
        """
        self._check_shape(x)
        dtype = x.dtype
        r = self.rows
        bonds = self._bonds(x)
        cos = _cos_angle(x, *r[2:, :3].T)
        torsions = _torsion(x, *r[3:].T)
        zb = (bonds - self.bond_loc.to(dtype)) / self.bond_scale.to(dtype)
        zw = (cos - self.cos_loc.to(dtype)) / self.cos_scale.to(dtype)
        zt = torch.where(self.torsion_periodic, torsions, self._torsion_z(torsions))
        ladj = -2.0 * torch.log(bonds).sum(-1) - self._scale_log_sum().to(dtype)
        return torch.cat([zb, zw, zt], dim=-1), ladj

    def from_standard(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Standardised internal coordinates → Cartesian positions (canonical frame).

        Circle torsions may take any real value (2π-periodic); the others must map into the
        physical range: bonds above 1e-4 nm, |cos θ| < 1, narrow torsions within π of
        their centre (|t|·s_φ < π, where the map from t to φ is one-to-one). Outside it
        the positions are those of the clamped values and ``valid`` is False.

        Returns:
            x ``(B, N, 3)`` nm, ``ladj`` ``(B,)`` = log|det dx/dz| = −(:meth:`to_standard`'s
            at x), and ``valid`` ``(B,)`` bool.
        """
        n = self.n_atoms
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise FlowforceError(f"expected z of shape (B, {self.dim}) (3N − 6 for N = {n} atoms), got {shape}")
        dtype = z.dtype
        zb, zw, zt = z[:, : n - 1], z[:, n - 1: 2 * n - 3], z[:, 2 * n - 3:]
        bonds = self.bond_loc.to(dtype) + self.bond_scale.to(dtype) * zb
        cos = self.cos_loc.to(dtype) + self.cos_scale.to(dtype) * zw
        narrow_dev = self.torsion_scale.to(dtype) * zt
        valid = ((bonds > MIN_BOND_NM).all(-1) & (cos.abs() < 1.0).all(-1)
                 & (self.torsion_periodic | (narrow_dev.abs() < math.pi)).all(-1))
        bonds = bonds.clamp_min(MIN_BOND_NM)
        cos = cos.clamp(-1.0, 1.0)
        sin = (1.0 - cos * cos).clamp_min(torch.finfo(dtype).tiny).sqrt()
        phi = torch.where(self.torsion_periodic, zt, self.torsion_loc.to(dtype) + narrow_dev)
        ladj = 2.0 * torch.log(bonds).sum(-1) + self._scale_log_sum().to(dtype)
        return self._place(bonds, cos, sin, phi), ladj, valid

    def standard_to_unit(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised internal coordinates → the unit cube of :meth:`to_unit`, elementwise.

        Φ on bonds, cos θ and narrow torsions; ``(t + π)/(2π)`` mod 1 on circles.

        Returns:
            u ``(B, 3N−6)`` and ``ladj`` ``(B,)`` = Σ log Φ'(z) − (number of circles)·log 2π.
        """
        n = self.n_atoms
        dtype = z.dtype
        head, zt = z[:, : 2 * n - 3], z[:, 2 * n - 3:]
        ut = torch.where(self.torsion_periodic, torch.remainder((zt + math.pi) / (2.0 * math.pi), 1.0),
                         torch.special.ndtr(zt))
        ladj = _log_dnormal_cdf(head).sum(-1)
        narrow = self.narrow_torsions
        if narrow.numel() > 0:
            ladj = ladj + _log_dnormal_cdf(zt.index_select(-1, narrow)).sum(-1)
        n_periodic = self.torsion_periodic.to(torch.float64).sum()
        return torch.cat([torch.special.ndtr(head), ut], dim=-1), ladj - (n_periodic * math.log(2.0 * math.pi)).to(dtype)

    def _place(self, bonds: Tensor, cos: Tensor, sin: Tensor, phi: Tensor) -> Tensor:
        """Positions ``(B, N, 3)``; internal arrays are indexed by Z-matrix row."""
        batch, n = bonds.shape[0], self.n_atoms
        rows = self.rows.tolist()
        row_of = {atom: p for p, atom in enumerate(r[0] for r in rows)}
        zero = bonds.new_zeros(batch)
        p0 = bonds.new_zeros(batch, 3)
        p1 = torch.stack([zero, zero, bonds[:, 0]], -1)
        # Row 2: bonded to row 0 or row 1 (its j), angle measured from the other (its k).
        pj, pk = (p0, p1) if row_of[rows[2][1]] == 0 else (p1, p0)
        axis = (pk - pj) / bonds[:, :1]
        x_hat = torch.stack([bonds.new_ones(batch), zero, zero], -1)
        p2 = pj + bonds[:, 1:2] * (cos[:, :1] * axis + sin[:, :1] * x_hat)
        placed = torch.cat([p0[:, None], p1[:, None], p2[:, None], bonds.new_zeros(batch, n - 3, 3)], 1)
        for group in self._placement_groups(rows, row_of):
            idx = torch.tensor(group, device=bonds.device)
            refs = torch.tensor([[row_of[a] for a in rows[p][1:]] for p in group], device=bonds.device)
            xj, xk, xl = placed[:, refs[:, 0]], placed[:, refs[:, 1]], placed[:, refs[:, 2]]
            e1 = _unit(xj - xk)
            e3 = _unit(torch.cross(xk - xl, e1, dim=-1))
            e2 = torch.cross(e3, e1, dim=-1)
            b, c, s, f = bonds[:, idx - 1, None], cos[:, idx - 2, None], sin[:, idx - 2, None], phi[:, idx - 3, None]
            new = xj + b * (-c * e1 + s * torch.cos(f) * e2 + s * torch.sin(f) * e3)
            placed = placed.index_copy(1, idx, new)
        inverse = torch.empty(n, dtype=torch.long)
        inverse[self.rows[:, 0].cpu()] = torch.arange(n)
        return placed[:, inverse.to(bonds.device)]

    @staticmethod
    def _placement_groups(rows: list[list[int]], row_of: dict[int, int]) -> list[list[int]]:
        """Rows ≥ 3 grouped so each group's references lie in rows 0..2 or earlier groups."""
        level = [0] * len(rows)
        groups: dict[int, list[int]] = {}
        for p in range(3, len(rows)):
            level[p] = 1 + max(level[row_of[a]] for a in rows[p][1:])
            groups.setdefault(level[p], []).append(p)
        return [groups[g] for g in sorted(groups)]

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, dim={self.dim}"
