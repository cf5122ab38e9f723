"""The per-example gradient contractions of EK-FAC, one module per operation, each with its pure-PyTorch
reference (also the CPU path) and cost model; the shape checks shared with :mod:`trustrepair.kernels`
(:mod:`~trustrepair.engine.ops.checks`) and the one rule that sends an operation to its Triton kernel
(:mod:`~trustrepair.engine.ops.routing`).

* :mod:`~trustrepair.engine.ops.projected_gradients` -- gradients in the EK-FAC eigenbasis: the eigenvalue
  correction's squares (routed to Triton), few examples' projected gradients, scores against eigenbasis
  queries;
* :mod:`~trustrepair.engine.ops.ghost_dots` -- per-example inner products with matrices in the original
  basis, full or low-rank;
* :mod:`~trustrepair.engine.ops.gram` -- covariance updates over half the products;
* :mod:`~trustrepair.engine.ops.blocking` -- how the references split a batch into chunks and slabs.

This package imports nothing itself, so importing :mod:`~trustrepair.engine.ops.checks` (what the kernels
do) loads nothing else.
"""
