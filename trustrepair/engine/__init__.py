"""The EK-FAC engine: tracked layers, token capture, factors and their fit, the per-example gradient
contractions with their pure-PyTorch references and the routing to :mod:`trustrepair.kernels`, and the
parallel helpers (``torch.distributed`` ranks, CUDA streams). Imports nothing from
:mod:`trustrepair.methods` or :mod:`trustrepair.app`."""
