"""layerscope: per-layer activation caches, probes, task vectors and patching maps for causal
LMs."""

__version__ = "0.1.0"
