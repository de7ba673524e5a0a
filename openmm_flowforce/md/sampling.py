"""Sampling from a trained Boltzmann generator, with optional reweighting to the
reference force field."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..reweighting import effective_sample_size, log_importance_weights
from ..io import CHECKPOINT_FORMAT, atomic_write_npz, check_outputs, load_checkpoint
from ..potentials.boltzmann import BoltzmannGenerator, model_from_checkpoint
from ..errors import FlowforceError
from ..safety import deserialize_xml


def _reference_system(metadata: dict[str, Any], model_path: str | Path, trust: bool | None) -> Any:
    """The reference ``openmm.System`` stored in the model file, read through the safety check."""
    xml = metadata.get("system_xml")
    if not xml:
        raise FlowforceError(f"{model_path} holds no reference System (it was trained on data without one); "
                             "re-run `flowforce md` and `flowforce train` with this version to reweight")
    return deserialize_xml(xml, f"the reference System (system_xml) in {model_path}", trust, expected="System")


@torch.no_grad()
def sample_boltzmann_generator(model_path: str | Path, n: int, out: str | Path, reweight: bool = False,
                               batch: int = 1000, seed: int = 0, n_workers: int = 0,
                               trust: bool | None = None) -> dict[str, Any]:
    """Draw ``n`` samples and write them to ``out`` (npz, atomically).

    The file holds ``positions`` (n, N, 3) nm in the canonical frame, ``log_q`` (n,), the
    ``topology_pdb``, and with ``reweight``: ``reduced_energies`` u = E/kT of the reference
    System, ``log_weights`` (log w = −u − log q, max-shifted; −inf for non-finite
    energies) and ``ess`` (Kish effective sample size as a fraction of n).

    ``trust``: see :mod:`openmm_flowforce.safety`; the stored System is refused if it could
    run code, unless trusted.

    Returns:
        A summary: ``n_samples``, and with ``reweight`` ``ess`` and ``n_nonfinite``.

    Raises:
        OutputError: ``out`` is the model file or cannot be written (checked first).
        UnsafeFileError: the stored System could run code (checked before sampling).
    """
    if n < 1 or batch < 1:
        raise FlowforceError(f"the number of samples and the batch must be at least 1, got n={n}, batch={batch}")
    check_outputs({"out": out}, {"model": model_path})
    state = load_checkpoint(model_path, CHECKPOINT_FORMAT, required=("model",))
    metadata = state.get("metadata", {})
    model: BoltzmannGenerator = model_from_checkpoint(state, model_path)
    system = _reference_system(metadata, model_path, trust) if reweight else None
    model.eval()  # in the dtype it was trained in (the loaders' one rule)
    xs, log_qs = [], []
    with torch.random.fork_rng(devices=[]):  # the samples come from the seed; the caller's RNG is untouched
        torch.manual_seed(seed)
        for start in range(0, n, batch):
            x, log_q = model.sample_and_log_prob(min(batch, n - start))
            xs.append(x.double())
            log_qs.append(log_q.double())
    x, log_q = torch.cat(xs), torch.cat(log_qs)
    arrays: dict[str, np.ndarray] = {"positions": x.numpy().astype(np.float32), "log_q": log_q.numpy(),
                                     "topology_pdb": np.array(model.topology_pdb)}
    summary: dict[str, Any] = {"n_samples": n}
    if reweight:
        from ..targets import OpenMMEnergy

        with OpenMMEnergy(system, metadata["temperature"], n_workers=n_workers) as energy:
            u = energy(x)
        log_w = log_importance_weights(u, log_q)
        summary["ess"] = effective_sample_size(log_w)
        summary["n_nonfinite"] = int((~torch.isfinite(u)).sum())
        arrays.update(reduced_energies=u.numpy(), log_weights=log_w.numpy(), ess=np.array(summary["ess"]))
    atomic_write_npz(out, arrays)
    return summary
