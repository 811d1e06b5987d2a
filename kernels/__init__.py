"""Triton kernels of sparse-attention, shipped as ``sparse_attention.kernels``.

Kept free of import-time side effects: modules here are imported lazily by ``sparse_attention.functional``.
"""
