"""Boltzmann generator of a molecule: internal coordinates + a flow on the unit cube.

Noé, Olsson, Köhler, Wu, Science 2019 (arXiv 1812.01729) with the smooth flows of
Köhler, Krämer, Noé, NeurIPS 2021 (arXiv 2110.00351). The density over Cartesian
positions x (nm), modulo rigid motions, is

    log q(x) = log q_flow(u(x)) + log|det du/dx|,

where u = ``InternalCoordinates.to_unit(x)``; the potential of mean force it defines is
U(x) = −kT·log q(x) in kJ/mol (up to a constant).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..conventions import energy_from_log_prob
from ..coordinates import InternalCoordinates
from ..flows import CouplingFlow
from ..data.dataset import topology_from_pdb_text, topology_to_pdb_text
from ..io import CHECKPOINT_FORMAT, bad_file, load_checkpoint
from ..errors import BadFileError, FlowforceError

Tensor = torch.Tensor
MODEL_KIND = "boltzmann_generator"


class BoltzmannGenerator(nn.Module):
    """A normalized density over the Cartesian positions of one molecule.

    Args:
        coordinates: internal coordinates of the molecule (fitted to data).
        flow: a flow on ``[0, 1]^(3N−6)`` with ``flow.config['periodic'] == coordinates.periodic``.
        topology_pdb: PDB text of the molecule, stored so the model file is self-contained.
    """

    def __init__(self, coordinates: InternalCoordinates, flow: CouplingFlow, topology_pdb: str = ""):
        super().__init__()
        if list(flow.config["periodic"]) != coordinates.periodic:
            raise FlowforceError("the flow's periodic dimensions must be the coordinates' torsions")
        self.coordinates = coordinates
        self.flow = flow
        self.topology_pdb = topology_pdb

    @classmethod
    def from_topology(cls, topology, positions_nm: Any, **flow_kwargs) -> "BoltzmannGenerator":
        """Build internal coordinates from the topology's bonds, fit them to positions
        ``(T, N, 3)`` nm, and put a flow (``CouplingFlow`` keyword arguments) on top."""
        positions = np.asarray(positions_nm)
        ic = InternalCoordinates.from_topology(topology, positions)
        flow = CouplingFlow(ic.periodic, **flow_kwargs)
        frame = positions[0] if positions.ndim == 3 else positions
        return cls(ic, flow, topology_to_pdb_text(topology, frame))

    @property
    def n_atoms(self) -> int:
        return self.coordinates.n_atoms

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) for positions ``(B, N, 3)`` nm; invariant to rigid motions."""
        u, ladj = self.coordinates.to_unit(x, check=False)
        return self.flow.log_prob(u) + ladj

    def energy(self, x: Tensor, temperature: float) -> Tensor:
        """U(x) = −kT·log q(x) in kJ/mol for positions ``(B, N, 3)`` nm."""
        return energy_from_log_prob(self.log_prob(x), temperature)

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """n samples ``(n, N, 3)`` nm in the canonical frame, and their log q."""
        u, log_q_u = self.flow.sample_and_log_prob(n)
        x, ladj = self.coordinates.from_unit(u)
        return x, log_q_u - ladj

    def sample(self, n: int) -> Tensor:
        return self.sample_and_log_prob(n)[0]

    def metadata(self) -> dict[str, Any]:
        """Plain data from which :func:`load_boltzmann_generator` rebuilds the model."""
        return {"kind": MODEL_KIND, "flow": dict(self.flow.config), "topology_pdb": self.topology_pdb}


def build_from_metadata(metadata: dict[str, Any]) -> BoltzmannGenerator:
    """An untrained model with the architecture recorded in ``metadata``."""
    if metadata.get("kind") != MODEL_KIND:
        raise FlowforceError(f"not a Boltzmann generator model (kind {metadata.get('kind')!r})")
    topology = topology_from_pdb_text(metadata["topology_pdb"])
    ic = InternalCoordinates.from_topology(topology)
    # Which torsions are circles was decided by fitting to data; the flow config records it.
    ic.set_periodic_torsions(metadata["flow"]["periodic"][2 * ic.n_atoms - 3:])
    return BoltzmannGenerator(ic, CouplingFlow(**metadata["flow"]), metadata["topology_pdb"])


def model_from_checkpoint(state: dict[str, Any], path: str | Path,
                          dtype: torch.dtype | None = None) -> BoltzmannGenerator:
    """The trained model held by ``state``, a checkpoint already loaded from ``path``.

    The one dtype rule of every Boltzmann-generator loader: the model is built and loaded in
    float64 (so no stored weight or derived constant is rounded on the way), then cast to
    ``dtype``, by default the dtype of the stored flow weights (the one it was trained in).

    Raises:
        BadFileError: the checkpoint holds another kind of model, or its metadata and
            weights do not make a model (an altered or incompatible file).
    """
    metadata = state.get("metadata", {})
    kind = metadata.get("kind") if isinstance(metadata, dict) else None
    if kind != MODEL_KIND:
        raise BadFileError(f"{path} holds a {kind or 'model of unknown kind'}, not a Boltzmann generator "
                           "(flowforce train writes those)")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build_from_metadata(metadata)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError, IndexError) as error:  # the file's contents, not the code
        raise bad_file(path, "a Boltzmann generator checkpoint", error, "re-create it with flowforce train") from None
    finally:
        torch.set_default_dtype(old)
    if dtype is None:
        stored = [v.dtype for k, v in state["model"].items() if k.startswith("flow.") and v.is_floating_point()]
        dtype = stored[0] if stored else old
    return model.to(dtype)


def load_boltzmann_generator(path: str | Path, dtype: torch.dtype | None = None) -> BoltzmannGenerator:
    """Load a trained Boltzmann generator from a trainer checkpoint (``weights_only``), in
    ``dtype`` (default: the dtype it was trained in; see :func:`model_from_checkpoint`)."""
    return model_from_checkpoint(load_checkpoint(path, CHECKPOINT_FORMAT, required=("model",)), path, dtype)
