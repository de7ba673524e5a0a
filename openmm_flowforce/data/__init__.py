"""Built-in systems and dataset files shipped with the package.

* :func:`alanine_dipeptide_pdb` — ACE-ALA-NME (22 atoms), amber14 vacuum minimum in the
  C7eq basin, regenerated deterministically by ``make_alanine_dipeptide.py``.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import MissingFileError

__all__ = ["alanine_dipeptide_pdb"]

_DATA_DIR = Path(__file__).resolve().parent


def alanine_dipeptide_pdb() -> str:
    """Path to the built-in alanine dipeptide PDB (positions in the file are Å, as in any PDB).

    Loads with ``openmm.app.PDBFile`` and ``mdtraj.load``; ``ForceField('amber14-all.xml')``
    parametrises it directly.

    Raises:
        FileNotFoundError: if the package was installed without its data files.
    """
    path = _DATA_DIR / "alanine_dipeptide.pdb"
    if not path.is_file():
        raise MissingFileError(
            f"{path} is missing: the package was installed without its data files; "
            "reinstall it, or regenerate the file with "
            "`python -m openmm_flowforce.data.make_alanine_dipeptide`"
        )
    return str(path)
