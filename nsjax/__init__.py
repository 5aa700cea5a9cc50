"""nsjax: Noisy Student Training in JAX/Flax."""

__version__ = "0.1.0"

from nsjax import host_memory as _host_memory

# Before JAX starts its CPU thread pools: see host_memory's docstring (up to 1.5x faster on CPU).
_host_memory.retain_freed_memory()
