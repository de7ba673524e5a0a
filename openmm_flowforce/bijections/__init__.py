"""Pure torch bijections: one contract ``(output, ladj)``, one Compose, one Inverse."""
from .base import (Bijection, CircularShift, Compose, ElementwiseFamily, Inverse, family_names,
                   get_family, register_family)
from .rootfind import invert_monotone, solve_monotone
from .smooth import SmoothFamily, SmoothMixture, smooth_mixture, smooth_step

try:  # the spline lives in its own module; imported here so it registers itself
    from .spline import RationalQuadraticSpline, SplineFamily
except ImportError:  # pragma: no cover - only while the module is being written
    pass

__all__ = ["Bijection", "CircularShift", "Compose", "ElementwiseFamily", "Inverse", "family_names",
           "get_family", "register_family", "invert_monotone", "solve_monotone", "SmoothFamily",
           "SmoothMixture", "smooth_mixture", "smooth_step", "RationalQuadraticSpline", "SplineFamily"]
