"""Benchmark against the peer libraries (dattri, pyDVL, captum, kronfluence); run ``python -m benchmarks.peers``."""
