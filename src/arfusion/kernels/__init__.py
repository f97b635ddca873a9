"""Triton kernels. Importing this package needs triton (the `cuda` extra)."""
