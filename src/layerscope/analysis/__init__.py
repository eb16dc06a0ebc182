"""Stage 3, analysis: pure computation on cached activations: linear probes (probes), descriptive
statistics (stats), task-vector geometry (task_vectors), intervals and sample sizes (power), the
cross-layer index (layer_index)."""
