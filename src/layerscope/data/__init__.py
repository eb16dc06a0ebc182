"""Stage 1, data: prompt tables from every input kind (datasets), the format and readers of the
HDF5 activation files (h5cache), and the check that cached files belong to the current prompt
table (consistency)."""
