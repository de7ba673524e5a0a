"""Packaging metadata for openmm_flowforce (the canonical place; pyproject.toml only names the backend)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def read_version() -> str:
    # Read, not import: importing the package at build time would need its dependencies.
    text = (HERE / "openmm_flowforce" / "_version.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("openmm_flowforce/_version.py does not define __version__")
    return match.group(1)


setup(
    name="openmm_flowforce",
    version=read_version(),
    description="OpenMM plugin and Python toolkit for learned molecular potentials built from normalizing flows",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["openmm_flowforce", "openmm_flowforce.*"]),
    package_data={"openmm_flowforce": ["data/*.pdb", "data/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # openmm-torch ships compiled against one libtorch ABI: acellera-openmmtorch 1.8-1.10
        # loads with torch 2.10-2.12 and fails with torch 2.13 ("no interpreter set"), so torch
        # is pinned to the range the openmm-torch wheel was built for.
        "torch>=2.10,<2.13",
        "openmm>=8.5",  # openmm.PythonForce appeared in 8.5
        # The openmm-torch wheel built for that torch ABI (provides the `openmmtorch` module).
        # The cu13 build also runs on CPU-only machines; CPU-only users may swap in
        # acellera-openmmtorch-cpu of the same version to avoid the CUDA libraries.
        "acellera-openmmtorch-cu13>=1.8,<1.11",
        "mdtraj",
        "parmed",
        "numpy",
        "scipy",
        "matplotlib",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        "bench": ["zuko"],
    },
    entry_points={"console_scripts": ["flowforce = openmm_flowforce.cli.main:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Chemistry",
        "Topic :: Scientific/Engineering :: Physics",
    ],
)
