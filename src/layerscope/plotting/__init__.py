"""Stage 5, figures: draw functions return a matplotlib Figure and one saver writes it; the only
place that imports matplotlib."""
