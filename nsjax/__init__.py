"""nsjax: Noisy Student Training in JAX/Flax."""

__version__ = "0.1.0"
