"""Operands of awkward shapes (one token, a batch of one, an all-masked example, widths 1, 17, 65) and naive
per-example loops, for the tests of trustrepair.engine.ops."""
import torch

SHAPES = [  # (B, T, d_in, d_out)
    (1, 1, 1, 1),
    (2, 1, 17, 5),
    (3, 7, 65, 17),
    (1, 9, 5, 65),
    (4, 3, 17, 17),
    (5, 70, 17, 1),
]


def operands(shape, dtype=torch.float64, n_mats=3, seed=0):
    """Random a, g (about 30% of tokens masked, and example 0 entirely when B > 1), orthogonal bases, matrices."""
    batch, tokens, d_in, d_out = shape
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, tokens, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, tokens, d_out, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, tokens, generator=gen) > 0.3
    if batch > 1:
        mask[0] = False
    a, g = a * mask[..., None], g * mask[..., None]
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))[0]
    mats = torch.randn(n_mats, d_out, d_in, generator=gen, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (a, g, q_a, q_s, mats))


def naive_gradients(a, g):
    """G_b = sum_t g_bt a_bt^T, one outer product at a time, in float64."""
    a, g = a.double(), g.double()
    out = torch.zeros(a.shape[0], g.shape[2], a.shape[2], dtype=torch.float64)
    for b in range(a.shape[0]):
        for t in range(a.shape[1]):
            out[b] += torch.outer(g[b, t], a[b, t])
    return out


def naive_squares(a, g, q_a, q_s):
    total = 0
    for grad in naive_gradients(a, g):
        total = total + (q_s.double().T @ grad @ q_a.double()) ** 2
    return total


def naive_scores(a, g, q_a, q_s, queries):
    out = torch.zeros(a.shape[0], queries.shape[0], dtype=torch.float64)
    for b, grad in enumerate(naive_gradients(a, g)):
        projected = q_s.double().T @ grad @ q_a.double()
        for q in range(queries.shape[0]):
            out[b, q] = (projected * queries[q].double()).sum()
    return out


def naive_ghost(a, g, u):
    out = torch.zeros(a.shape[0], u.shape[0], dtype=torch.float64)
    for b in range(a.shape[0]):
        for k in range(u.shape[0]):
            for t in range(a.shape[1]):
                out[b, k] += g[b, t].double() @ u[k].double() @ a[b, t].double()
    return out


def assert_close(actual, expected, rtol, what):
    """Relative error against the largest expected magnitude, with a verbose report of the worst entry."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    scale = expected.abs().max().clamp_min(1e-30)
    worst = int(err.argmax())
    assert float(err.max()) <= rtol * float(scale), (
        f"{what}: max error {float(err.max()):.3e} (relative {float(err.max() / scale):.3e} > {rtol:g}) at flat "
        f"index {worst}; {int((err > rtol * scale).sum())} of {err.numel()} entries off")




def force_costs(monkeypatch, cheap, dear):
    """Make the cost functions named in ``cheap`` free and those in ``dear`` prohibitive (each patched in the
    ops module that defines it)."""
    for names, value in ((cheap, 0), (dear, 10**18)):
        for name in names:
            monkeypatch.setattr(cost_module(name), name, lambda *args, value=value: value)


def cost_module(name):
    """The module of trustrepair.engine.ops that defines the cost function ``name``."""
    from trustrepair.engine.ops import ghost_dots, projected_gradients

    return projected_gradients if name.startswith("squares") else ghost_dots


TOKENS_FIRST = (["squares_tokens_first_cost"], ["squares_gradient_first_cost"])
GRADIENT_FIRST = (["squares_gradient_first_cost"], ["squares_tokens_first_cost"])
PER_TOKEN = (["ghost_per_token_cost"], ["ghost_gradient_first_cost"])
FORM_GRADIENT = (["ghost_gradient_first_cost"], ["ghost_per_token_cost"])
