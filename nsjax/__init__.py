"""nsjax: Noisy Student Training in JAX/Flax."""

__version__ = "0.1.0"

import os as _os

from nsjax import host_memory as _host_memory

# Opt-in here (the CLI decides by step size): before JAX starts its CPU thread pools.
if _os.environ.get(_host_memory.ENV_SWITCH) == "1":
  _host_memory.retain_freed_memory()
