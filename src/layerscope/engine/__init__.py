"""Stage 2, engine: loading the model (loading), tokens, the BOS policy and batches (tokens), the
batched forward pass that caches pooled activations of every layer and cuts out per-layer files
(store), the native transformers engine with TransformerLens hook names (native), and the parity
self-check against plain transformers (parity)."""
