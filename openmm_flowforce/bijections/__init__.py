"""Pure torch bijections: one contract ``(output, ladj)``, one Compose, one Inverse."""
from .base import (Bijection, CircularShift, Compose, ElementwiseFamily, Inverse, family_names,
                   get_family, register_family)
from .rootfind import invert_monotone, solve_monotone
from .smooth import SmoothFamily, SmoothMixture, smooth_mixture, smooth_step
from .spline import RationalQuadraticSpline, SplineFamily
from .ispline import ISpline, ISplineFamily

__all__ = ["Bijection", "CircularShift", "Compose", "ElementwiseFamily", "Inverse", "family_names",
           "get_family", "register_family", "invert_monotone", "solve_monotone", "SmoothFamily",
           "SmoothMixture", "smooth_mixture", "smooth_step", "RationalQuadraticSpline", "SplineFamily",
           "ISpline", "ISplineFamily"]
