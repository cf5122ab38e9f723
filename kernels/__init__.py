"""Triton kernels of trustrepair, installed as ``trustrepair.kernels``.

Each operation lives in its own module with its private ``@triton.jit`` kernel, the launcher and the
public function; the pure-PyTorch reference of every kernel is in :mod:`trustrepair.contractions`.
"""
