"""Build an OpenMM System for reference MD from the input files a user has.

One entry point, :func:`load_system`, returns ``(topology, system, positions_nm)`` for any
of the input kinds in :data:`INPUT_KINDS`:

==========  ===========================================  ===================================
kind        options                                      read by
==========  ===========================================  ===================================
builtin     ``system`` (a name in :data:`BUILTIN_SYSTEMS`)  OpenMM ``ForceField`` (``forcefield``)
pdb         ``pdb``, ``forcefield``                       OpenMM ``ForceField``
amber       ``prmtop``, ``inpcrd``                        ``parmed.load_file``
charmm      ``psf``, ``toppar``, ``crd`` or ``pdb``       ``parmed`` + ``CharmmParameterSet``
gromacs     ``top``, ``gro``                              ``parmed.load_file``
==========  ===========================================  ===================================

Every route builds the same kind of System: no cutoff (``NoCutoff``; the molecules this
package models are small and non-periodic), vacuum or generalized Born implicit solvent
(OBC2 or GBn2, :data:`SOLVENTS`), and by default no constraints (:data:`CONSTRAINTS`): a flow
models every bond length, so the reference data must sample them; ``"hbonds"`` is for when
only configurations with rigid X–H bonds are wanted (and allows a 2 fs time step).

Hydrogen-mass repartitioning (``hydrogen_mass``, HMR; Hopkins, Le Grand, Walker, Roitberg,
J. Chem. Theory Comput. 11, 1864 (2015)) makes every hydrogen bonded to a heavy atom
heavier and takes the added mass from that heavy atom, so each molecule keeps its total
mass. Masses do not enter the Boltzmann distribution of positions, so the sampled
configurations are those of the unmodified System; only the dynamics (time scales) change.
With ``constraints="hbonds"`` it allows a 4 fs time step (:func:`default_timestep_fs`).

Every user error raises :class:`SystemInputError` (a ``ValueError``) whose message names
the bad option and says what to do.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..data import alanine_dipeptide_pdb
from ..errors import FlowforceError
from ..safety import check_forcefield_file

__all__ = [
    "BUILTIN_SYSTEMS",
    "CONSTRAINTS",
    "DEFAULT_FORCEFIELD",
    "DEFAULT_HYDROGEN_MASS",
    "INPUT_KINDS",
    "SOLVENTS",
    "InputKind",
    "SystemInputError",
    "default_timestep_fs",
    "load_system",
]

#: Force field used by the ``pdb`` and ``builtin`` routes when none is given.
DEFAULT_FORCEFIELD: tuple[str, ...] = ("amber14-all.xml",)

#: Built-in systems: name → function returning the path of its PDB file.
BUILTIN_SYSTEMS: dict[str, Callable[[], str]] = {
    "alanine-dipeptide": alanine_dipeptide_pdb,
}


@dataclass(frozen=True)
class Solvent:
    """How one solvent model enters each route.

    Attributes:
        forcefield_files: XML files appended to the user's force field (OpenMM ForceField routes).
        implicit_solvent: name of the ``openmm.app`` implicit-solvent constant passed to
            parmed's ``createSystem`` (``None``: vacuum).
    """

    forcefield_files: tuple[str, ...]
    implicit_solvent: str | None
    description: str = ""


#: Solvent models: ``vacuum``; ``implicit``, OBC2 generalized Born (Onufriev, Bashford,
#: Case, Proteins 55, 383 (2004)); ``gbn2``, the GB-Neck2 model (Nguyen, Roe, Simmerling,
#: J. Chem. Theory Comput. 9, 2020 (2013)), the one Amber recommends with ff14SB for proteins.
SOLVENTS: dict[str, Solvent] = {
    "vacuum": Solvent(forcefield_files=(), implicit_solvent=None, description="no solvent"),
    "implicit": Solvent(forcefield_files=("implicit/obc2.xml",), implicit_solvent="OBC2",
                        description="OBC2 generalized Born"),
    "gbn2": Solvent(forcefield_files=("implicit/gbn2.xml",), implicit_solvent="GBn2",
                    description="GBn2 generalized Born (proteins, with amber14)"),
}

#: Hydrogen mass in dalton used by ``--hmr``. 1.5 Da is a small change that, measured here,
#: keeps 4 fs ``LangevinMiddleIntegrator`` dynamics of chignolin (amber14 + GBn2, rigid X–H
#: bonds) stable at 300 K and 600 K: kinetic temperature within 1% of the bath. Hopkins et
#: al. (2015) use 3.024 Da, which other integrators need for 4 fs.
DEFAULT_HYDROGEN_MASS = 1.5
#: Allowed hydrogen masses (Da): above a hydrogen's own mass, and at most what leaves a
#: methyl carbon (12 Da, three hydrogens) with a positive mass and a CH3 rotor that is not
#: dominated by its hydrogens.
HYDROGEN_MASS_RANGE = (1.008, 4.0)

#: Constraint choices → name of the ``openmm.app`` constant (``None``: every bond flexible).
CONSTRAINTS: dict[str, str | None] = {"none": None, "hbonds": "HBonds"}


def default_timestep_fs(constraints: str, hydrogen_mass: float | None) -> float:
    """The time step (fs) a System built with these options integrates stably with
    ``LangevinMiddleIntegrator``: 1 fs with every bond flexible, 2 fs with rigid X–H bonds
    or heavier hydrogens, 4 fs with both (rigid X–H bonds and HMR)."""
    rigid_hydrogens = constraints != "none"
    heavy_hydrogens = hydrogen_mass is not None
    if rigid_hydrogens and heavy_hydrogens:
        return 4.0
    return 2.0 if rigid_hydrogens or heavy_hydrogens else 1.0


class SystemInputError(FlowforceError):
    """The input files or options cannot make a System; the message says how to fix it."""


@dataclass(frozen=True)
class Options:
    """The options every loader sees (validated by :func:`load_system`)."""

    files: dict[str, Any]
    solvent: Solvent
    constraints: Any  # None or openmm.app.HBonds
    hydrogen_mass: float | None = None  # dalton; None: the force field's masses

    def mass_arguments(self) -> dict[str, Any]:
        """``hydrogenMass`` for ``createSystem`` (OpenMM's ForceField and parmed take the same name)."""
        if self.hydrogen_mass is None:
            return {}
        from openmm import unit

        return {"hydrogenMass": self.hydrogen_mass * unit.dalton}


Loaded = tuple[Any, Any, np.ndarray]  # (openmm.app.Topology, openmm.System, positions (N, 3) nm)


@dataclass(frozen=True)
class InputKind:
    """One way of giving a system.

    Attributes:
        name: short name used in messages.
        key: the option that selects this kind.
        required: options that must be given with ``key``.
        optional: options that may be given with ``key``.
        load: builds ``(topology, system, positions_nm)`` from the :class:`Options`.
        need: one-line description of a complete input, used in error messages.
    """

    name: str
    key: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    load: Callable[[Options], Loaded]
    need: str

    @property
    def accepted(self) -> tuple[str, ...]:
        return (self.key, *self.required, *self.optional)


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------

def _flag(option: str) -> str:
    """``'inpcrd'`` → ``'--inpcrd'`` (messages speak the command line's language)."""
    return "--" + option.replace("_", "-")


def _existing_file(option: str, path: str | os.PathLike) -> str:
    """``path`` as a string, or a :class:`SystemInputError` if it is not a readable file."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise SystemInputError(f"{_flag(option)} {path}: {what}; check the path (relative paths are "
                               f"relative to {Path.cwd()})")
    return str(p)


def _forcefield_files(names: Sequence[str] | None, solvent: Solvent) -> list[str]:
    files = list(names) if names else list(DEFAULT_FORCEFIELD)
    return files + [f for f in solvent.forcefield_files if f not in files]


def _bundled_forcefields() -> list[str]:
    """Top-level force field XML files that ship with OpenMM (for error messages)."""
    from openmm import app

    folder = Path(app.__file__).resolve().parent / "data"
    return sorted(p.name for p in folder.glob("*.xml") if p.name not in {"pdbNames.xml", "residues.xml"})


def _openmm_forcefield(files: Sequence[str]):
    from openmm import app

    for name in files:
        check_forcefield_file(name)  # before OpenMM runs the <Script>s a user's file may hold
        try:
            app.ForceField(name)
        except Exception as error:  # OpenMM raises ValueError, KeyError or a bare Exception for bad files
            if not (isinstance(error, ValueError) and "Could not locate file" in str(error)):
                raise SystemInputError(f"--forcefield {name}: not a valid force field file ({error})") from None
            shown = ", ".join(_bundled_forcefields())
            raise SystemInputError(
                f"--forcefield {name}: unknown force field file; give the path of an XML file or the name "
                f"of one that ships with OpenMM, e.g. {shown} (implicit solvent: use --solvent implicit or gbn2)"
            ) from None
    return app.ForceField(*files)


def _create_with_forcefield(topology, positions_nm: np.ndarray, options: Options, source: str) -> Loaded:
    """The OpenMM ``ForceField`` route shared by ``builtin`` and ``pdb``."""
    from openmm import app

    files = _forcefield_files(options.files.get("forcefield"), options.solvent)
    forcefield = _openmm_forcefield(files)
    try:
        system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=options.constraints,
                                         **options.mass_arguments())
    except ValueError as error:
        raise SystemInputError(
            f"{source}: force field {' + '.join(files)} cannot parametrise it ({error}); add the XML files that "
            "define these residues with --forcefield, or add missing hydrogens first (e.g. PDBFixer or "
            "openmm.app.Modeller.addHydrogens)"
        ) from None
    return topology, system, positions_nm


def _read_pdb(option: str, path: str):
    from openmm import app, unit

    path = _existing_file(option, path)
    try:
        pdb = app.PDBFile(path)
    except Exception as error:  # PDBFile raises several types on malformed files
        raise SystemInputError(f"{_flag(option)} {path}: not a readable PDB file ({type(error).__name__}: "
                               f"{error})") from None
    positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    return pdb.topology, positions


def _parmed_load(option: str, path: str, **kwargs):
    import parmed

    path = _existing_file(option, path)
    try:
        return parmed.load_file(path, **kwargs)
    except Exception as error:  # parmed raises its own hierarchy plus IOError/ValueError
        raise SystemInputError(f"{_flag(option)} {path}: parmed cannot read it ({type(error).__name__}: "
                               f"{error}); check that the file has the format this option expects") from None


def _coordinates_angstrom(option: str, path: str) -> np.ndarray:
    """Coordinates ``(N, 3)`` in Å of the first frame of a coordinate file, read by parmed."""
    loaded = _parmed_load(option, path)
    xyz = getattr(loaded, "coordinates", None)
    if xyz is None:
        raise SystemInputError(f"{_flag(option)} {path}: the file holds no coordinates")
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz[0] if xyz.ndim == 3 else xyz


def _attach_coordinates(structure, topology_option: str, coordinates_option: str, xyz_angstrom: np.ndarray) -> None:
    n_top, n_xyz = len(structure.atoms), len(xyz_angstrom)
    if n_top != n_xyz:
        raise SystemInputError(
            f"{_flag(topology_option)} has {n_top} atoms but {_flag(coordinates_option)} has {n_xyz}; "
            "give the coordinate file that belongs to this topology"
        )
    structure.coordinates = xyz_angstrom


def _create_with_parmed(structure, options: Options, source: str, **extra) -> Loaded:
    """``structure.createSystem`` with this package's settings; positions in nm."""
    from openmm import app

    implicit = options.solvent.implicit_solvent
    try:
        system = structure.createSystem(
            nonbondedMethod=app.NoCutoff,
            constraints=options.constraints,
            implicitSolvent=getattr(app, implicit) if implicit else None,
            **options.mass_arguments(),
            **extra,
        )
    except Exception as error:  # parmed raises its own types for missing parameters
        raise SystemInputError(f"{source}: cannot build an OpenMM System ({type(error).__name__}: {error})") from None
    positions = np.asarray(structure.coordinates, dtype=np.float64) / 10.0  # parmed: Å
    return structure.topology, system, positions


# ---------------------------------------------------------------------------------------
# Loaders, one per input kind
# ---------------------------------------------------------------------------------------

def _load_builtin(options: Options) -> Loaded:
    name = options.files["system"]
    if name not in BUILTIN_SYSTEMS:
        raise SystemInputError(f"--system {name}: unknown built-in system; choose one of "
                               f"{', '.join(BUILTIN_SYSTEMS)}")
    topology, positions = _read_pdb("system", BUILTIN_SYSTEMS[name]())
    return _create_with_forcefield(topology, positions, options, f"--system {name}")


def _load_pdb(options: Options) -> Loaded:
    topology, positions = _read_pdb("pdb", options.files["pdb"])
    return _create_with_forcefield(topology, positions, options, f"--pdb {options.files['pdb']}")


def _load_amber(options: Options) -> Loaded:
    structure = _parmed_load("prmtop", options.files["prmtop"])
    _attach_coordinates(structure, "prmtop", "inpcrd", _coordinates_angstrom("inpcrd", options.files["inpcrd"]))
    return _create_with_parmed(structure, options, f"--prmtop {options.files['prmtop']}")


def _load_gromacs(options: Options) -> Loaded:
    structure = _parmed_load("top", options.files["top"])
    _attach_coordinates(structure, "top", "gro", _coordinates_angstrom("gro", options.files["gro"]))
    return _create_with_parmed(structure, options, f"--top {options.files['top']}")


def _load_charmm(options: Options) -> Loaded:
    from parmed.charmm import CharmmParameterSet, CharmmPsfFile

    files = options.files
    given = [name for name in ("crd", "pdb") if files.get(name)]
    if len(given) != 1:
        raise SystemInputError("--psf needs the coordinates in exactly one of --crd FILE or --pdb FILE "
                               f"(got {' and '.join(_flag(g) for g in given) or 'neither'})")
    psf_path = _existing_file("psf", files["psf"])
    toppar = [_existing_file("toppar", path) for path in files["toppar"]]
    try:
        psf = CharmmPsfFile(psf_path)
    except Exception as error:
        raise SystemInputError(f"--psf {psf_path}: not a readable CHARMM PSF file ({type(error).__name__}: "
                               f"{error})") from None
    try:
        params = CharmmParameterSet(*toppar)
    except Exception as error:
        raise SystemInputError(f"--toppar {' '.join(toppar)}: CharmmParameterSet cannot read them "
                               f"({type(error).__name__}: {error}); give .rtf/.top, .prm/.par and .str files"
                               ) from None
    _attach_coordinates(psf, "psf", given[0], _coordinates_angstrom(given[0], files[given[0]]))
    return _create_with_parmed(psf, options, f"--psf {psf_path}", params=params)


#: Input kind name → how it is given and loaded. The kind is chosen by which ``key``
#: option is present; ``--pdb`` selects ``pdb`` unless ``--psf`` is given (then it holds
#: the CHARMM coordinates).
INPUT_KINDS: dict[str, InputKind] = {
    kind.name: kind
    for kind in (
        InputKind("builtin", "system", (), ("forcefield",), _load_builtin,
                  f"--system NAME (one of {', '.join(BUILTIN_SYSTEMS)})"),
        InputKind("pdb", "pdb", (), ("forcefield",), _load_pdb, "--pdb FILE [--forcefield XML ...]"),
        InputKind("amber", "prmtop", ("inpcrd",), (), _load_amber, "--prmtop FILE --inpcrd FILE"),
        InputKind("charmm", "psf", ("toppar",), ("crd", "pdb"), _load_charmm,
                  "--psf FILE --toppar FILE [FILE ...] and --crd FILE or --pdb FILE"),
        InputKind("gromacs", "top", ("gro",), (), _load_gromacs, "--top FILE --gro FILE"),
    )
}


def _choose_kind(given: set[str]) -> InputKind:
    matching = [kind for kind in INPUT_KINDS.values() if kind.key in given]
    # An option that is the key of one kind and an optional of another (--pdb with --psf)
    # belongs to the other.
    matching = [kind for kind in matching
                if not any(kind.key in other.optional for other in matching if other is not kind)]
    if len(matching) > 1:
        raise SystemInputError(
            f"{' and '.join(_flag(k.key) for k in matching)} cannot be combined: give one system, one of\n  "
            + "\n  ".join(k.need for k in INPUT_KINDS.values())
        )
    if not matching:
        stray = ", ".join(sorted(_flag(g) for g in given))
        raise SystemInputError(f"{stray} given without a system to apply to; give one of\n  "
                               + "\n  ".join(k.need for k in INPUT_KINDS.values()))
    kind = matching[0]
    missing = [name for name in kind.required if name not in given]
    if missing:
        raise SystemInputError(f"{_flag(kind.key)} also needs {', '.join(_flag(m) for m in missing)}: "
                               f"give {kind.need}")
    extra = sorted(given - set(kind.accepted))
    if extra:
        raise SystemInputError(f"{', '.join(_flag(e) for e in extra)} cannot be used with {_flag(kind.key)} "
                               f"(it takes {kind.need})")
    return kind


def _lookup(table: dict[str, Any], value: str, option: str) -> Any:
    if value not in table:
        raise SystemInputError(f"{_flag(option)} {value}: unknown; choose one of {', '.join(table)}")
    return table[value]


def load_system(
    *,
    system: str | None = None,
    pdb: str | os.PathLike | None = None,
    forcefield: Sequence[str] | None = None,
    prmtop: str | os.PathLike | None = None,
    inpcrd: str | os.PathLike | None = None,
    psf: str | os.PathLike | None = None,
    crd: str | os.PathLike | None = None,
    toppar: Sequence[str | os.PathLike] | None = None,
    top: str | os.PathLike | None = None,
    gro: str | os.PathLike | None = None,
    solvent: str = "vacuum",
    constraints: str = "none",
    hydrogen_mass: float | None = None,
) -> Loaded:
    """Topology, System and positions of one molecule, from any supported input.

    Give exactly one system: ``system`` (a built-in name), ``pdb`` (+ ``forcefield``),
    ``prmtop`` + ``inpcrd``, ``psf`` + ``toppar`` + (``crd`` or ``pdb``), or ``top`` +
    ``gro``. With none of them, the built-in alanine dipeptide is used.

    Args:
        system: name of a built-in system (:data:`BUILTIN_SYSTEMS`).
        pdb: PDB file (the system, or the CHARMM coordinates when ``psf`` is given).
        forcefield: OpenMM force field XML files for ``system``/``pdb``
            (default :data:`DEFAULT_FORCEFIELD`).
        prmtop, inpcrd: AMBER topology and coordinates.
        psf, crd, toppar: CHARMM PSF, CHARMM coordinates, and the topology/parameter/stream
            files read by ``parmed.charmm.CharmmParameterSet``.
        top, gro: GROMACS topology and coordinates.
        solvent: a key of :data:`SOLVENTS` (``vacuum``, ``implicit`` = OBC2, ``gbn2``).
        constraints: a key of :data:`CONSTRAINTS` (``none``: every bond flexible, what a
            flow over all coordinates needs; ``hbonds``: rigid bonds to hydrogen).
        hydrogen_mass: hydrogen-mass repartitioning: mass in Da of every hydrogen bonded to
            a heavy atom, the difference taken from that atom (None: unchanged masses; see
            :data:`DEFAULT_HYDROGEN_MASS`, :data:`HYDROGEN_MASS_RANGE`).

    Returns:
        ``(topology, system, positions)`` with an ``openmm.app.Topology``, an
        ``openmm.System`` without cutoff, and positions ``(N, 3)`` float64 in nm.

    Raises:
        SystemInputError: missing or unreadable files, options that do not go together,
            unknown force fields or names, atom counts that differ between topology and
            coordinates; the message names the problem and the fix.
    """
    from openmm import app

    files = {"system": system, "pdb": pdb, "forcefield": forcefield, "prmtop": prmtop, "inpcrd": inpcrd,
             "psf": psf, "crd": crd, "toppar": toppar, "top": top, "gro": gro}
    files = {name: value for name, value in files.items() if value is not None and value != [] and value != ()}
    if not set(files) - {"forcefield"}:
        files["system"] = next(iter(BUILTIN_SYSTEMS))
    kind = _choose_kind(set(files))
    constraint = _lookup(CONSTRAINTS, constraints, "constraints")
    if hydrogen_mass is not None:
        low, high = HYDROGEN_MASS_RANGE
        if not (math.isfinite(hydrogen_mass) and low < hydrogen_mass <= high):
            raise SystemInputError(f"--hydrogen-mass {hydrogen_mass:g}: must be above {low:g} and at most {high:g} "
                                   f"Da (default with --hmr: {DEFAULT_HYDROGEN_MASS:g})")
    options = Options(
        files=files,
        solvent=_lookup(SOLVENTS, solvent, "solvent"),
        constraints=getattr(app, constraint) if constraint else None,
        hydrogen_mass=None if hydrogen_mass is None else float(hydrogen_mass),
    )
    topology, openmm_system, positions = kind.load(options)
    if openmm_system.getNumParticles() != len(positions):
        raise SystemInputError(f"the System has {openmm_system.getNumParticles()} particles but the coordinates "
                               f"have {len(positions)}; give matching files")
    return topology, openmm_system, positions
