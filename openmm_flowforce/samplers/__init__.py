"""Energy-only samplers: iDEM, FAB, reverse-KL flows, SNF, CRAFT and ESH dynamics behind one registry."""
from .registry import SamplerMethod, get_method, method_names, register_method
from . import fab, reverse_kl  # noqa: F401,E402  registers "fab" and "reverse-kl"
from . import idem  # noqa: F401,E402  registers "idem"
from . import craft, snf  # noqa: F401,E402  registers "craft" and "snf"
from . import esh_method  # noqa: F401,E402  registers "esh"

__all__ = ["SamplerMethod", "get_method", "method_names", "register_method"]
