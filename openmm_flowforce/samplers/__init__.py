"""Energy-only samplers: iDEM, FAB and reverse-KL flows behind one registry."""
from .registry import SamplerMethod, get_method, method_names, register_method
from . import fab, reverse_kl  # noqa: F401,E402  registers "fab" and "reverse-kl"
from . import idem  # noqa: F401,E402  registers "idem"

__all__ = ["SamplerMethod", "get_method", "method_names", "register_method"]
