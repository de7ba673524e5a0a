"""Sampling from a trained Boltzmann generator, with optional reweighting to the
reference force field."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..reweighting import effective_sample_size, log_importance_weights
from ..io import CHECKPOINT_FORMAT, atomic_write_npz, load_checkpoint
from ..potentials.boltzmann import BoltzmannGenerator, build_from_metadata
from ..errors import FlowforceError


def _target(metadata: dict[str, Any], n_workers: int):
    from openmm import XmlSerializer

    from ..targets import OpenMMEnergy

    xml = metadata.get("system_xml")
    if not xml:
        raise FlowforceError("the model file holds no reference System (it was trained on data without one); "
                         "re-run `flowforce md` and `flowforce train` with this version to reweight")
    return OpenMMEnergy(XmlSerializer.deserialize(xml), metadata["temperature"], n_workers=n_workers)


@torch.no_grad()
def sample_boltzmann_generator(model_path: str | Path, n: int, out: str | Path, reweight: bool = False,
                               batch: int = 1000, seed: int = 0, n_workers: int = 0) -> dict[str, Any]:
    """Draw ``n`` samples and write them to ``out`` (npz, atomically).

    The file holds ``positions`` (n, N, 3) nm in the canonical frame, ``log_q`` (n,), the
    ``topology_pdb``, and with ``reweight``: ``reduced_energies`` u = E/kT of the reference
    System, ``log_weights`` (log w = −u − log q, max-shifted; −inf for non-finite
    energies) and ``ess`` (Kish effective sample size as a fraction of n).

    Returns:
        A summary: ``n_samples``, and with ``reweight`` ``ess`` and ``n_nonfinite``.
    """
    if n < 1:
        raise FlowforceError(f"the number of samples must be at least 1, got {n}")
    state = load_checkpoint(model_path, CHECKPOINT_FORMAT)
    metadata = state.get("metadata", {})
    model: BoltzmannGenerator = build_from_metadata(metadata)
    model.load_state_dict(state["model"])
    model.eval()
    model.to(next(v.dtype for k, v in state["model"].items() if k.startswith("flow.") and v.is_floating_point()))
    torch.manual_seed(seed)
    xs, log_qs = [], []
    for start in range(0, n, batch):
        x, log_q = model.sample_and_log_prob(min(batch, n - start))
        xs.append(x.double())
        log_qs.append(log_q.double())
    x, log_q = torch.cat(xs), torch.cat(log_qs)
    arrays: dict[str, np.ndarray] = {"positions": x.numpy().astype(np.float32), "log_q": log_q.numpy(),
                                     "topology_pdb": np.array(model.topology_pdb)}
    summary: dict[str, Any] = {"n_samples": n}
    if reweight:
        with _target(metadata, n_workers) as energy:
            u = energy(x)
        log_w = log_importance_weights(u, log_q)
        summary["ess"] = effective_sample_size(log_w)
        summary["n_nonfinite"] = int((~torch.isfinite(u)).sum())
        arrays.update(reduced_energies=u.numpy(), log_weights=log_w.numpy(), ess=np.array(summary["ess"]))
    atomic_write_npz(out, arrays)
    return summary
