r"""CG energy networks: physical priors plus a network on invariant features.

:class:`CGNet` is the contract every CG net shares (priors, ``energy_and_forces``, config,
model files); :class:`CGEnergyNet` is the MLP net below, :class:`~.schnet.CGSchNet` a
message-passing net that scales to larger molecules; :data:`CG_NETS` names them. The MLP net:

    E(X) = Σ_priors E_prior(X) + kT · MLP(standardise(features(X)))      (kJ/mol),
    F(X) = −∇_X E(X)                                                      (kJ/mol/nm),

for bead positions ``X`` ``(B, n, 3)`` nm. The features are all bead-pair distances, the cosines
of the bonded angles and ``(cos φ, sin φ)`` of the bonded dihedrals (for a chain: consecutive
triples and quadruples), standardised by mean/std buffers fitted to data; they are invariant
under translations and rotations, so E is too and F is equivariant. (``(cos φ, sin φ)`` is not
invariant under reflections: φ → −φ, as it must be for chiral molecules.)

The last layer of the MLP starts at zero, so an untrained network *is* its priors. Trained by
force matching (:mod:`openmm_flowforce.training.cg`): Köhler, Chen, Krämer, Clementi, Noé,
"Flow-matching: efficient coarse-graining of molecular dynamics without forces", JCTC 2023,
arXiv:2203.11167; CGSchNet-style priors + network after Husic et al., arXiv:2007.11412, and
torchmd-net's model/prior split (forces by ``autograd.grad(create_graph=self.training)``; fixed
return types so ``torch.jit.script`` compiles the module).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..conventions import kT as thermal_energy
from ..io import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from ..nn.mlp import MLP
from .priors import PRIORS, BeadGraph, build_prior, cos_angles, dihedral_cos_sin, dihedral_cos_sin_weighted, distances
from ..errors import FlowforceError

__all__ = ["CGEnergyNet", "CGFeatures", "CGNet", "CG_NETS", "DEFAULT_PRIORS", "DIHEDRAL_FEATURES", "MODEL_KIND",
           "cg_metadata", "cg_net_class", "load_cg_net", "net_from_metadata", "register_cg_net", "save_cg_net"]

MODEL_KIND = "cg_energy_net"
#: Priors used when the caller does not say (``dihedrals`` is optional: the network learns them).
DEFAULT_PRIORS: dict[str, dict[str, Any]] = {"bonds": {}, "angles": {}, "repulsion": {}}
#: Floor on feature standard deviations, so a constant feature does not blow up.
MIN_FEATURE_STD = 1e-4
CONFIG_KEYS = ("n_beads", "bonds", "hidden", "activation", "priors", "temperature", "dihedral_features")
#: How the MLP net sees a bonded dihedral φ: ``cos_sin`` = ``(cos φ, sin φ)`` (forces diverge as
#: 1/sin θ where a bonded angle θ turns linear); ``weighted`` = ``sin θ₁ sin θ₂ (cos φ, sin φ)``
#: (smooth everywhere: :func:`~.priors.dihedral_cos_sin_weighted`). Model files written before
#: the choice existed are ``cos_sin``.
DIHEDRAL_FEATURES = ("cos_sin", "weighted")


class CGFeatures(nn.Module):
    """Invariant features ``(B, F)``: distances of all pairs, cos of bonded angles, cos and sin of
    bonded dihedrals (``dihedrals="weighted"``: times the sines of their two angles,
    :data:`DIHEDRAL_FEATURES`); standardised as ``(feature − mean) / std`` with fitted buffers."""

    def __init__(self, graph: BeadGraph, dihedrals: str = "cos_sin"):
        super().__init__()
        if dihedrals not in DIHEDRAL_FEATURES:
            raise FlowforceError(f"unknown dihedral features {dihedrals!r}; valid: {', '.join(DIHEDRAL_FEATURES)}")
        self.weighted = dihedrals == "weighted"
        n = graph.n_beads
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        self.register_buffer("pairs", torch.tensor(pairs, dtype=torch.long).reshape(-1, 2))
        self.register_buffer("triples", torch.tensor(list(graph.angles), dtype=torch.long).reshape(-1, 3))
        self.register_buffer("quads", torch.tensor(list(graph.dihedrals), dtype=torch.long).reshape(-1, 4))
        width = len(pairs) + len(graph.angles) + 2 * len(graph.dihedrals)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    def raw(self, x: Tensor) -> Tensor:
        # A constant of the module: TorchScript and torch.export keep one branch.
        cos, sin = dihedral_cos_sin_weighted(x, self.quads) if self.weighted else dihedral_cos_sin(x, self.quads)
        return torch.cat([distances(x, self.pairs), cos_angles(x, self.triples), cos, sin], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return (self.raw(x) - self.mean) / self.std

    @torch.no_grad()
    def fit(self, positions: Tensor) -> None:
        """Mean and std (floored at 1e-4) of every feature over positions ``(T, n, 3)`` nm."""
        raw = self.raw(positions.to(torch.float64))
        self.mean.copy_(raw.mean(0))
        self.std.copy_(raw.std(0).clamp_min(MIN_FEATURE_STD))


def _normalise_priors(priors: Sequence[str] | Mapping[str, Mapping[str, Any] | None]) -> dict[str, dict[str, Any]]:
    if isinstance(priors, str):
        raise FlowforceError(f"priors must be a list of names or a mapping name → options, got the string {priors!r}")
    items = dict(priors) if isinstance(priors, Mapping) else {name: {} for name in priors}
    unknown = sorted(set(items) - set(PRIORS))
    if unknown:
        raise FlowforceError(f"unknown prior(s) {', '.join(unknown)}; valid priors: {', '.join(PRIORS)}")
    return {name: dict(options or {}) for name, options in items.items()}


class CGNet(nn.Module):
    """Priors plus a learned energy of CG bead positions: the contract every CG net shares.

        E(X) = Σ_priors E_prior(X) + kT · network(features(X))      (kJ/mol),

    with ``features`` a module ``(B, n, 3) → (B, F)`` of invariant geometry (computed in float64
    by the compiled exports) and ``network`` ``(B, F) → (B, 1)`` (in the export dtype); see
    :class:`~openmm_flowforce.export.models.CGEnergy`. Subclasses build ``features`` and
    ``network`` in ``__init__`` after :meth:`_init_priors`, set :attr:`NET` (their name in
    :data:`CG_NETS`) and :attr:`CONFIG_KEYS`, and store their constructor arguments in
    ``self._config`` (plain data).
    """

    NET = ""
    CONFIG_KEYS: tuple[str, ...] = ()
    #: Keys of :attr:`CONFIG_KEYS` that a config may lack (added after model files existed).
    OPTIONAL_CONFIG_KEYS: tuple[str, ...] = ()

    def _init_priors(self, n_beads: int, bonds: Sequence[Sequence[int]],
                     priors: Sequence[str] | Mapping[str, Any], temperature: float) -> tuple[BeadGraph, dict[str, Any]]:
        """``nn.Module.__init__``, the priors and the energy unit; returns the bead graph and the
        normalised prior options (for the config)."""
        nn.Module.__init__(self)
        if int(n_beads) < 2:
            raise FlowforceError(f"a CG energy network needs at least 2 beads, got {n_beads}")
        graph = BeadGraph.from_bonds(int(n_beads), bonds)
        prior_options = _normalise_priors(priors)
        self._n_beads = int(n_beads)
        self.priors = nn.ModuleList([build_prior(name, graph, options) for name, options in prior_options.items()])
        self.register_buffer("energy_scale", torch.tensor(thermal_energy(temperature)))
        return graph, prior_options

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def options_from_mapping(cls, mapping: Any, options: dict[str, Any]) -> dict[str, Any]:
        """Constructor options a net takes from a CG mapping (none here; CGSchNet: bead types)."""
        return options

    @classmethod
    def from_data(cls, system: Any, positions: Any, temperature: float, bonds: Sequence[Sequence[int]] | None = None,
                  priors: Sequence[str] | Mapping[str, Any] = tuple(DEFAULT_PRIORS), **options: Any) -> "CGNet":
        """A network for a CG molecule with priors and feature standardisation fitted to data.

        Args:
            system: a :class:`~openmm_flowforce.coordinates.cg_mapping.CGMapping` (its beads,
                bonds and, for nets that use them, bead types), or the number of beads (then
                ``bonds`` is required).
            positions: CG positions ``(T, n, 3)`` nm (map all-atom data with
                ``mapping.map_positions`` first).
            temperature: K of the data.
            bonds, priors: as in the constructor.
            **options: the network's constructor options (MLP: ``hidden``, ``activation``).

        Raises:
            ValueError: positions of the wrong shape, bonds missing or given twice.
        """
        if isinstance(system, (int, np.integer)):
            if bonds is None:
                raise FlowforceError("give bonds=[(i, j), ...] with a bead count, or pass a CGMapping")
            n_beads = int(system)
        else:
            if bonds is not None:
                raise FlowforceError("bonds come from the mapping; do not pass bonds= with a CGMapping")
            n_beads, bonds = system.n_beads, system.bonds
            options = cls.options_from_mapping(system, dict(options))
        x = torch.as_tensor(np.asarray(positions) if not isinstance(positions, Tensor) else positions)
        if x.ndim != 3 or tuple(x.shape[1:]) != (n_beads, 3):
            hint = ""
            if not isinstance(system, (int, np.integer)) and x.ndim == 3 and x.shape[1] == system.n_atoms:
                hint = "; these look like all-atom positions: pass mapping.map_positions(positions)"
            raise FlowforceError(f"positions must be CG positions (T, {n_beads}, 3) nm, got {tuple(x.shape)}{hint}")
        net = cls(n_beads, bonds, priors=priors, temperature=temperature, **options)
        net.fit_priors(x, temperature)
        return net

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "CGNet":
        """An unfitted network with the architecture of :meth:`config` (load the state dict next).

        Raises:
            ValueError: missing or unknown keys (named)."""
        name = str(config.get("net", "mlp"))
        if name != cls.NET:
            return cg_net_class(name).from_config(config)
        config = {key: value for key, value in config.items() if key != "net"}
        missing = sorted(set(cls.CONFIG_KEYS) - set(config) - set(cls.OPTIONAL_CONFIG_KEYS))
        unknown = sorted(set(config) - set(cls.CONFIG_KEYS))
        if missing or unknown:
            raise FlowforceError(f"CG energy net config: missing keys {missing}, unknown keys {unknown}; "
                                 f"a config has {', '.join(cls.CONFIG_KEYS)}")
        return cls(**config)

    def config(self) -> dict[str, Any]:
        """Plain data (lists, str, float, int) from which :meth:`from_config` rebuilds the net."""
        return copy.deepcopy(self._config)

    @torch.no_grad()
    def fit_priors(self, positions: Any, temperature: float) -> None:
        """Fit every prior (Boltzmann inversion at ``temperature`` K) and the feature
        standardisation to CG positions ``(T, n, 3)`` nm; sets the energy unit to this kT."""
        x = torch.as_tensor(np.asarray(positions) if not isinstance(positions, Tensor) else positions)
        x = x.detach().to(device=self.energy_scale.device, dtype=torch.float64)
        for prior in self.priors:
            prior.fit(x, temperature)
        self.features.fit(x)
        self.energy_scale.fill_(thermal_energy(temperature))
        self._config["temperature"] = float(temperature)

    @property
    def n_beads(self) -> int:
        return self._n_beads

    # -- energies and forces -----------------------------------------------------------------
    def prior_energy(self, positions: Tensor) -> Tensor:
        """Σ_priors E_prior, ``(B,)`` kJ/mol."""
        energy = torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device)
        for prior in self.priors:
            energy = energy + prior(positions)
        return energy

    def forward(self, positions: Tensor) -> Tensor:
        """Energy ``(B,)`` kJ/mol of bead positions ``(B, n, 3)`` nm."""
        return self.prior_energy(positions) + self.energy_scale * self.network(self.features(positions)).squeeze(-1)

    @torch.jit.export
    def energy_and_forces(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Energy ``(B,)`` kJ/mol and forces ``−∇E`` ``(B, n, 3)`` kJ/mol/nm.

        In training mode the forces keep their graph (``create_graph``), so a force-matching
        loss can be differentiated with respect to the parameters; in eval mode they do not.
        Eager calls work under ``torch.no_grad()``; a scripted module needs grad mode on
        (TorchScript has no ``enable_grad``), as it is inside OpenMM-Torch.
        """
        if not torch.jit.is_scripting() and not torch.is_grad_enabled():
            return self._energy_and_forces_with_grad(positions)
        if not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        energy = self.forward(positions)
        grads = torch.autograd.grad([energy.sum()], [positions], create_graph=self.training)
        gradient = grads[0]
        assert gradient is not None
        return energy, -gradient

    @torch.jit.unused
    def _energy_and_forces_with_grad(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            return self.energy_and_forces(positions)


class CGEnergyNet(CGNet):
    """Priors plus an MLP energy of CG bead positions (module docstring has the maths).

    Args:
        n_beads: beads of the CG molecule (at least 2).
        bonds: bead pairs ``(i, j)``; angles, dihedrals and non-bonded pairs follow from them.
        hidden: hidden widths of the MLP.
        activation: MLP activation (a smooth one: forces are its derivative).
        priors: names from :data:`~openmm_flowforce.potentials.priors.PRIORS`, or a mapping
            name → constructor options, e.g. ``{"bonds": {}, "dihedrals": {"n_terms": 3}}``.
        temperature: K; the network's energy unit is kT at this temperature.
        dihedral_features: :data:`DIHEDRAL_FEATURES` (``weighted`` for molecules whose bonded
            angles can turn linear, e.g. Cα chains).

    Build from data with :meth:`from_data`; rebuild from :meth:`config` with :meth:`from_config`.
    """

    NET = "mlp"
    CONFIG_KEYS = CONFIG_KEYS
    OPTIONAL_CONFIG_KEYS = ("dihedral_features",)  # older model files: cos_sin

    def __init__(self, n_beads: int, bonds: Sequence[Sequence[int]], hidden: Sequence[int] = (64, 64),
                 activation: str = "silu", priors: Sequence[str] | Mapping[str, Any] = tuple(DEFAULT_PRIORS),
                 temperature: float = 300.0, dihedral_features: str = "cos_sin"):
        graph, prior_options = self._init_priors(n_beads, bonds, priors, temperature)
        # No "net" key: MLP configs stay readable by versions that predate the other nets.
        self._config = {"n_beads": int(n_beads), "bonds": [list(b) for b in graph.bonds],
                        "hidden": [int(h) for h in hidden], "activation": str(activation),
                        "priors": copy.deepcopy(prior_options), "temperature": float(temperature),
                        "dihedral_features": str(dihedral_features)}
        self.features = CGFeatures(graph, str(dihedral_features))
        self.network = MLP(self.features.n_features, 1, hidden, activation, zero_last=True)


#: CG net registry: name (``flowforce cg --net``) → class. ``schnet`` registers on import of
#: :mod:`.schnet`, which :func:`cg_net_class` does on demand.
CG_NETS: dict[str, type[CGNet]] = {"mlp": CGEnergyNet}


def register_cg_net(name: str) -> Callable[[type[CGNet]], type[CGNet]]:
    """Class decorator adding a :class:`CGNet` subclass to :data:`CG_NETS` under ``name``."""
    def decorate(cls: type[CGNet]) -> type[CGNet]:
        CG_NETS[name] = cls
        return cls
    return decorate


def cg_net_class(name: str) -> type[CGNet]:
    """The class of the CG net called ``name`` (``mlp``, ``schnet``).

    Raises:
        FlowforceError: an unknown name (the message lists the valid ones)."""
    from . import schnet  # noqa: F401 - registers "schnet"

    if name not in CG_NETS:
        raise FlowforceError(f"unknown CG net {name!r}; valid: {', '.join(CG_NETS)}")
    return CG_NETS[name]


# -- model files ------------------------------------------------------------------------------------
def cg_metadata(net: CGNet, mapping: Any = None) -> dict[str, Any]:
    """Plain data stored with a checkpoint: the net's config and, if given, the mapping's dict."""
    return {"kind": MODEL_KIND, "net": net.config(), "mapping": None if mapping is None else mapping.to_dict()}


def net_from_metadata(metadata: Mapping[str, Any]) -> CGNet:
    """An unfitted network with the architecture recorded by :func:`cg_metadata` (configs
    without a ``net`` name are MLP nets)."""
    if metadata.get("kind") != MODEL_KIND:
        raise FlowforceError(f"not a CG energy network model (kind {metadata.get('kind')!r})")
    return cg_net_class(str(metadata["net"].get("net", "mlp"))).from_config(metadata["net"])


def save_cg_net(path: str | Path, net: CGNet, mapping: Any = None) -> None:
    """Write a model file (a checkpoint with ``model`` and ``metadata``) atomically."""
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": net.state_dict(), "metadata": cg_metadata(net, mapping)},
                    path)


def load_cg_net(path: str | Path) -> tuple[CGNet, Any]:
    """``(net, mapping or None)`` from a file of :func:`save_cg_net` or of ``train_cg_net``
    (``weights_only`` loading: no code runs from the file). The net is in eval mode, in the
    floating-point dtype it was saved in."""
    from ..coordinates.cg_mapping import CGMapping

    state = load_checkpoint(path, CHECKPOINT_FORMAT)
    metadata = state.get("metadata", {})
    net = net_from_metadata(metadata)
    dtypes = {t.dtype for t in state["model"].values() if t.is_floating_point()}
    if len(dtypes) == 1:  # keep the precision it was saved in
        net = net.to(dtypes.pop())
    net.load_state_dict(state["model"])
    mapping = metadata.get("mapping")
    return net.eval(), (None if mapping is None else CGMapping.from_dict(mapping))
