"""Energy-only samplers: iDEM, FAB and reverse-KL flows behind one registry."""
from .registry import SamplerMethod, get_method, method_names, register_method

__all__ = ["SamplerMethod", "get_method", "method_names", "register_method"]
