"""Why force matching needs many frames: signal and noise of the torsional mean force.

    python bench/bench_force_noise.py --reference ref20.npz [--bins 12] [--json out.json]

Alanine dipeptide mapped to the 5 backbone beads: the mapped all-atom forces are projected
onto generalised forces on the CG internal coordinates, ``G = (BBᵀ)⁻¹BF``
(:mod:`openmm_flowforce.training.internal_forces`), and the two torsions (φ, ψ) are binned on
a ``bins × bins`` grid. Per torsion: the RMS of the bin means about the overall mean (the
*signal*: the mean force −∂A/∂q that force matching must learn) and the s.d. within bins (the
*noise* each frame adds; an upper bound, since a bin also holds real variation of the mean
force). Force matching estimates each bin's mean from the frames in it, so with N frames over
B occupied bins its error is about noise / √(N/B): the table prints that next to the signal.
Rows for both force maps (:mod:`openmm_flowforce.coordinates.force_maps`): ``basic`` (the
summed forces of each bead's atoms) and ``optimal`` (the least-noise valid map, fitted to
every 20th frame, 1000 of the 20 000, as force matching on 1000 frames would fit it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="reference dataset with forces (.npz)")
    parser.add_argument("--bins", type=int, default=12, help="bins per torsion")
    parser.add_argument("--frames", type=int, nargs="+", default=[500, 1000, 2000, 5000, 20000])
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from openmm_flowforce.coordinates.cg_mapping import CGMapping
    from openmm_flowforce.coordinates.force_maps import optimal_force_map, system_constraints
    from openmm_flowforce.data.dataset import load_dataset
    from openmm_flowforce.safety import deserialize_xml
    from openmm_flowforce.training.internal_forces import internal_coordinates, projection_matrices

    data = load_dataset(args.reference)
    mapping = CGMapping.from_topology(data.topology, "backbone")
    x = torch.as_tensor(np.asarray(mapping.map_positions(data.positions.astype(np.float64))))
    all_atom = data.forces.astype(np.float64)
    constraints = system_constraints(deserialize_xml(data.system_xml, "system_xml", expected="System")) \
        if data.system_xml else []
    fit = all_atom[:: max(1, len(all_atom) // 1000)]
    maps = {"basic": np.asarray(mapping.map_forces(all_atom)),
            "optimal": np.einsum("Ia,tac->tIc", optimal_force_map(fit, mapping.position_matrix, constraints), all_atom)}
    ic = internal_coordinates(mapping.cg_topology())
    projection = projection_matrices(ic, x)
    torsions = ic.to_internal(x, check=False)[2].numpy()
    nb = args.bins
    index = np.clip(((torsions + np.pi) / (2 * np.pi) * nb).astype(int), 0, nb - 1)
    cell = index[:, 0] * nb + index[:, 1]
    counts = np.bincount(cell, minlength=nb * nb)
    occupied = int((counts >= 5).sum())
    rows = {}
    for name, mapped in maps.items():
        f = torch.as_tensor(mapped).reshape(len(mapped), -1)
        g_torsion = torch.einsum("tkc,tc->tk", projection, f).numpy()[:, -torsions.shape[1]:]
        for k in range(torsions.shape[1]):
            means = np.bincount(cell, weights=g_torsion[:, k], minlength=nb * nb) / np.maximum(counts, 1)
            signal = float(np.sqrt(np.mean((means[cell] - g_torsion[:, k].mean()) ** 2)))
            noise = float((g_torsion[:, k] - means[cell]).std())
            rows[f"{name}, torsion {k + 1}"] = {
                "cartesian_rms": float(np.sqrt(np.mean(mapped ** 2))), "instantaneous_rms": float(g_torsion[:, k].std()),
                "signal_rms": signal, "noise_sd": noise, "noise_over_signal": noise / signal,
                "error_over_signal": {n: noise / np.sqrt(n / occupied) / signal for n in args.frames}}
    print(f"{len(x)} frames, {occupied} of {nb * nb} bins with ≥ 5 frames (kJ/mol/rad); {len(constraints)} constraints")
    print("| force map, torsion | Cartesian RMS (kJ/mol/nm) | instantaneous RMS | signal (bin means) | noise (within bins) "
          "| noise / signal | " + " | ".join(f"error / signal at {n}" for n in args.frames) + " |")
    for name, row in rows.items():
        print(f"| {name} | {row['cartesian_rms']:.0f} | {row['instantaneous_rms']:.1f} | {row['signal_rms']:.1f} | "
              f"{row['noise_sd']:.1f} | {row['noise_over_signal']:.1f} | "
              + " | ".join(f"{v:.2f}" for v in row["error_over_signal"].values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"bins": nb, "occupied_bins": occupied, "torsions": rows}, indent=1))


if __name__ == "__main__":
    main()
