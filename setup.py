"""Packaging metadata for openmm_flowforce (the canonical place; pyproject.toml names the backend and
the build requirements).

Building also compiles the native OpenMM plugin (``CMakeLists.txt``) against the ``openmm`` and
``torch`` wheels that pyproject.toml's build requirements bring in. Where that cannot work (no
C++ compiler, no cmake) the package installs without it and says so; every other backend still
works. ``FLOWFORCE_REQUIRE_NATIVE=1`` turns a failed native build into a failed install (CI sets
it); ``FLOWFORCE_SKIP_NATIVE=1`` skips the build.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
NATIVE_LIBRARY = "libOpenMMFlowForce.so"


def read_version() -> str:
    # Read, not import: importing the package at build time would need its dependencies.
    text = (HERE / "openmm_flowforce" / "_version.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("openmm_flowforce/_version.py does not define __version__")
    return match.group(1)


def _versions() -> dict:
    """torch and openmm versions of the Python that builds (the build environment)."""
    out = subprocess.run([sys.executable, "-c", "import json, torch, openmm; print(json.dumps({'torch_version': "
                          "torch.__version__, 'openmm_version': openmm.__version__}))"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class CMakeExtension(Extension):
    """The native plugin: a shared library built by CMake, not by setuptools' compiler driver."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class BuildNative(build_ext):
    """Run CMake for the plugin; install the library, its C++ test and build_info.json into
    ``openmm_flowforce/_native`` (the source tree for editable installs)."""

    def get_ext_filename(self, fullname: str) -> str:
        if fullname.endswith("._native." + NATIVE_LIBRARY[:-3]):
            return os.path.join(*fullname.split(".")[:-1], NATIVE_LIBRARY)
        return super().get_ext_filename(fullname)

    def run(self) -> None:
        for ext in self.extensions:
            self.build_native(ext)

    def build_native(self, ext: Extension) -> None:
        editable = self.inplace or getattr(self, "editable_mode", False)
        destination = (HERE if editable else Path(self.build_lib).resolve()) / "openmm_flowforce" / "_native"
        destination.mkdir(parents=True, exist_ok=True)
        info = {"status": "skipped", "reason": "", "python": sys.executable}
        required = os.environ.get("FLOWFORCE_REQUIRE_NATIVE") == "1"
        try:
            if os.environ.get("FLOWFORCE_SKIP_NATIVE") == "1":
                raise RuntimeError("FLOWFORCE_SKIP_NATIVE=1")
            info.update(_versions())
            cmake = shutil.which("cmake")
            compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
            if cmake is None or compiler is None:
                raise RuntimeError("no " + ("cmake" if cmake is None else "C++ compiler") + " on PATH")
            build_dir = Path(self.build_temp).resolve() / "native"
            build_dir.mkdir(parents=True, exist_ok=True)
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            jobs = ["--parallel", str(os.cpu_count() or 1)]
            subprocess.run([cmake, "-S", str(HERE), "-B", str(build_dir), *generator,
                            f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"], check=True)
            subprocess.run([cmake, "--build", str(build_dir), *jobs], check=True)
            subprocess.run([cmake, "--install", str(build_dir), "--prefix", str(destination)], check=True)
            info.update(status="built", reason="", compiler=compiler)
        except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError) as error:
            if required:
                raise
            info.update(status="failed" if "SKIP" not in str(error) else "skipped", reason=str(error))
            print(f"warning: the native OpenMM plugin was not built ({error}); the torchforce and pythonforce "
                  "backends still work", file=sys.stderr)
        (destination / "build_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


setup(
    name="openmm_flowforce",
    version=read_version(),
    description="OpenMM plugin and Python toolkit for learned molecular potentials built from normalizing flows",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["openmm_flowforce", "openmm_flowforce.*"]),
    ext_modules=[CMakeExtension("openmm_flowforce._native.libOpenMMFlowForce")],
    cmdclass={"build_ext": BuildNative},
    package_data={"openmm_flowforce": ["data/*.pdb", "data/*.yaml", "_native/*"]},
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
        "deeptime",  # TICA in `flowforce evaluate --protein`
    ],
    extras_require={
        # openmmml: so that the test run exercises the openmm-ml entry point (tests/test_openmmml.py).
        "test": ["pytest", "pytest-timeout", "openmmml"],
        "bench": ["zuko"],
        # MLPotential("flowforce", modelFile=...) through openmm-ml's entry point below.
        "openmmml": ["openmmml"],
    },
    entry_points={
        "console_scripts": ["flowforce = openmm_flowforce.cli.main:main"],
        "openmmml.potentials": ["flowforce = openmm_flowforce.openmmml_adapter:FlowForcePotentialImplFactory"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Chemistry",
        "Topic :: Scientific/Engineering :: Physics",
    ],
)
