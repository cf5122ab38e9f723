"""Triton kernels of trustrepair, installed as ``trustrepair.kernels``.

Each operation lives in its own module with its private ``@triton.jit`` kernel, the launcher and the
public function; the pure-PyTorch reference of every kernel is in :mod:`trustrepair.engine.contractions`, whose
dispatchers send CUDA tensors of the operations in ``TRITON_OPS`` here (``TRUSTREPAIR_DISABLE_TRITON=1``
forces the reference).

* :mod:`~trustrepair.kernels.projected_gradients` -- ``projected_gradient_squares_triton`` (EK-FAC's
  eigenvalue correction, sum_b (Q_S^T G_b Q_A)^2) and ``projected_gradient_scores_triton``
  (<Q_S^T G_b Q_A, W_q> per example and query), one tile kernel with a constexpr mode;
* :mod:`~trustrepair.kernels.ghost_dots` -- ``ghost_dots_triton`` (<G_b, U_k> = sum_t g_t^T U_k a_t) and
  ``low_rank_ghost_dots_triton`` (the same with U_k = L_k R_k, contracted through the tokens);
* :mod:`~trustrepair.kernels._launch` -- the device, dtype and precision rules every launcher applies.

Every public function is a ``torch.library`` custom op (``torch.ops.trustrepair.*``) with a fake
implementation, so it traces under ``torch.compile``. Importing a module imports triton and registers
its ops; this package itself imports nothing, so ``import trustrepair`` never needs triton. On CPU-only
machines the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is
imported (the tests do this), at small float32 / float64 sizes.
"""
