"""Triton kernels of trustrepair, installed as ``trustrepair.kernels``.

Each operation lives in its own module with its private ``@triton.jit`` kernel, the launcher and the
public function; its pure-PyTorch reference, and the rule that decides which of the two runs, are in the
library (:mod:`trustrepair.engine.ops`), which prepares the operands' layout before calling a kernel.
This package imports nothing from trustrepair except :mod:`trustrepair.engine.ops.checks`, the shape and
dtype checks it shares with the references.

* :mod:`~trustrepair.kernels.projected_gradients` -- ``projected_gradient_squares_triton`` (EK-FAC's
  eigenvalue correction, sum_b (Q_S^T G_b Q_A)^2), reference
  :func:`trustrepair.engine.ops.projected_gradients.projected_gradient_squares_reference`;
* :mod:`~trustrepair.kernels._launch` -- the device and precision rules every launcher applies, and the
  TF32 rounding.

Every public function is a ``torch.library`` custom op (``torch.ops.trustrepair.*``) with a fake
implementation, so it traces under ``torch.compile``. Importing a module imports triton and registers
its ops; this package itself imports nothing, so ``import trustrepair`` never needs triton. On CPU-only
machines the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is
imported (the tests do this), at small float32 / float64 sizes.
"""
