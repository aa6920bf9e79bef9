"""Applications built on the library: the offline quickstart and the speed benchmark.

Nothing in the core package imports from here (tests/test_layers.py checks it).
"""
