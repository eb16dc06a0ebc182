"""Stage 2, engine: the batched forward pass that caches pooled activations of every layer
(activations), the native transformers engine with TransformerLens hook names (native), and the
parity self-check against plain transformers (parity)."""
