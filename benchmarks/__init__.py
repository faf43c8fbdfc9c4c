"""Benchmarks of the sparse encoder against SparK's dense-masked simulation (see sparse_vs_dense.py)."""
