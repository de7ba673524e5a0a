"""Learned energies: Boltzmann generators (−kT log q) and, later, CG networks with priors."""
from .boltzmann import BoltzmannGenerator, build_from_metadata, load_boltzmann_generator

__all__ = ["BoltzmannGenerator", "build_from_metadata", "load_boltzmann_generator"]
