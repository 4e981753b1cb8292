"""Fused GPU kernels, each the fast twin of a readable PyTorch reference op.

Submodules import Triton; import them only where a kernel is used, so that the package imports
without it.
"""
