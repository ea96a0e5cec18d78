"""stream-reco: fresh music recommendations from a live stream of plays."""

from stream import _kernel_cache

__version__ = "0.1.0"

# before anything imports numba: its kernel cache is keyed by the kernel sources
_kernel_cache.configure()
