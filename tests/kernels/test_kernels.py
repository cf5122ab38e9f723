"""Triton kernels of trustrepair.kernels against their PyTorch references in trustrepair.engine.ops.

Where the kernels run: on a CUDA device when there is one (compiled), otherwise on CPU tensors in Triton's
interpreter; tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA before anything imports
triton (the interpreter is chosen when a kernel is defined, so setting it later has no effect).

Tolerance (flash-attention's rule, STYLE.md): against a float64 "truth" (the reference run on the same
inputs in float64), a kernel's largest error may be at most twice that of the plain PyTorch version in the
kernel's dtype, plus a small absolute slack of 2^-20 times the largest truth entry. For exact float32 the
plain version is the reference itself (it computes in float32); for TF32 and bfloat16 (GPU only) it is the
kernel's own chain of products run in PyTorch in that precision (TF32 matmuls; bfloat16 without upcasting,
as flash-attention compares), so both sides round the same operands. TF32 rounding itself is checked on
every device: the kernels must round their operands to the nearest TF32 value, as cuBLAS does, and then
agree with a float64 product of the rounded operands to float32 accumulation. The kernels compute every
float dtype they are given; the library routes float64 and exact float32 on CUDA to the reference
(trustrepair.engine.ops.routing; tested at the end); in the interpreter the kernels run in float64 and
must match the reference to 1e-11. Inputs are fresh random draws of awkward sizes (1, 17, 65: not multiples of any
block), with random masked tokens, an all-masked example, one token and a batch of one. Launchers allocate
their buffers with torch.empty; the tests poison those allocations with NaN, so any element a kernel fails
to write shows up.
"""
import math
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from benchmarks.common import matmul_precision  # noqa: E402
from trustrepair.engine.ops import projected_gradients as PG  # noqa: E402
from trustrepair.engine.ops import routing  # noqa: E402
from trustrepair.engine.tunables import override  # noqa: E402
from trustrepair.kernels import _launch  # noqa: E402
from trustrepair.kernels import projected_gradients as pg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _launch.INTERPRET:
    raise RuntimeError("no CUDA device and the Triton kernels were defined without TRITON_INTERPRET=1: set it "
                       "in the environment before triton is imported (tests/conftest.py does so)")

# (B, T, d_in, d_out, Q or K, rank of the low-rank factors)
CASES = [
    (1, 1, 1, 1, 1, 1),     # one of everything
    (1, 17, 65, 17, 3, 5),  # batch of one, a layer wider than a tile
    (3, 1, 17, 65, 1, 17),  # one token per example
    (5, 65, 17, 1, 3, 1),   # d_out = 1, tokens over several blocks, several examples per program
    (2, 17, 65, 65, 3, 17),
]
IDS = ["ones", "batch1", "token1", "dout1", "square65"]


def _random_orthogonal(n, gen):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]


def _draw(case, seed, dtype=torch.float32):
    """Fresh operands: activations and gradients zero at masked tokens (example 0 fully masked when B > 1),
    eigenbases, query / aspect matrices and low-rank factors."""
    batch, tokens, d_in, d_out, n_mats, rank = case
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, tokens, 1, generator=gen) > 0.3
    keep[-1, 0] = True  # at least one live token
    if batch > 1:
        keep[0] = False
    ops = {
        "a": torch.randn(batch, tokens, d_in, generator=gen, dtype=torch.float64) * keep,
        "g": torch.randn(batch, tokens, d_out, generator=gen, dtype=torch.float64) * keep,
        "q_a": _random_orthogonal(d_in, gen),
        "q_s": _random_orthogonal(d_out, gen),
        "mats": torch.randn(n_mats, d_out, d_in, generator=gen, dtype=torch.float64),
        "left": torch.randn(n_mats, d_out, rank, generator=gen, dtype=torch.float64),
        "right": torch.randn(n_mats, rank, d_in, generator=gen, dtype=torch.float64),
    }
    return {k: v.to(dtype=dtype, device=DEVICE) for k, v in ops.items()}


def _f64(ops):
    return {k: v.double() for k, v in ops.items()}


# One entry per kernel: (kernel, its reference twin, the plain same-dtype algebra), each taking the
# operand dict. The plain algebra is the kernel's own order of products in the operand dtype, without
# upcasting: the baseline of the tolerance rule for TF32 and bfloat16.
def _plain_squares(o):
    q_a, q_s = o["q_a"].to(o["a"].dtype), o["q_s"].to(o["a"].dtype)
    p = torch.bmm((o["g"] @ q_s).transpose(1, 2), o["a"] @ q_a)
    return (p * p).sum(0)


OPS = {
    "squares": (lambda o: pg.projected_gradient_squares_triton(o["a"], o["g"], o["q_a"], o["q_s"]),
                lambda o: PG.projected_gradient_squares_reference(o["a"], o["g"], o["q_a"], o["q_s"]),
                _plain_squares),
}
ALL_CONFIGS = list(pg.CONFIGS)


@pytest.fixture(autouse=True)
def one_configuration(monkeypatch):
    """Compiled (CUDA), the launcher tunes over the first configuration only, so a test compiles and times
    one kernel per case instead of up to eight; every configuration is checked, forced one by one, in
    test_every_configuration_matches_reference (the interpreter has one anyway)."""
    if not _launch.INTERPRET:
        monkeypatch.setattr(pg._example_tiles_kernel, "configs", ALL_CONFIGS[:1])


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors while the test runs."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)


def assert_within_rule(name, out, truth, baseline):
    """``max|out - truth| <= 2 max|baseline - truth| + 2^-20 max|truth|``, with a report of where it fails."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    out, truth, baseline = out.double().cpu(), truth.double().cpu(), baseline.double().cpu()
    scale = truth.abs().max().item() if truth.numel() else 0.0
    allowed = 2 * (baseline - truth).abs().max().item() + 2.0 ** -20 * scale if truth.numel() else 0.0
    err = (out - truth).abs()
    bad = ~(err <= allowed)  # NaN counts as bad
    if bad.any():
        worst = torch.nan_to_num(err, nan=math.inf).argmax()
        idx = tuple(int(i) for i in torch.unravel_index(worst, err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} entries off by more than {allowed:.3g} (largest truth "
            f"entry {scale:.3g}); worst at {idx}: kernel {out[idx].item():.8g}, truth {truth[idx].item():.8g}, "
            f"plain PyTorch {baseline[idx].item():.8g}; NaN entries: {int(out.isnan().sum())}")


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_reference_float32(op, case, poison_empty):
    kernel, reference, _ = OPS[op]
    ops = _draw(case, seed=zlib.crc32(f"{op}{case}".encode()))
    truth = reference(_f64(ops))
    assert_within_rule(op, kernel(ops), truth, reference(ops))


@pytest.mark.skipif(DEVICE == "cuda", reason="float64 is the interpreter's exactness check; the library routes "
                                             "float64 on CUDA to the reference (see the next test)")
@pytest.mark.parametrize("op", sorted(OPS))
def test_kernel_float64_is_exact_to_rounding(op, poison_empty):
    kernel, reference, _ = OPS[op]
    ops = _f64(_draw((3, 17, 17, 65, 3, 5), seed=7))
    out = kernel(ops)
    truth = reference(ops)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, truth, rtol=1e-11, atol=1e-11 * truth.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(OPS))
def test_float64_on_cuda_runs_the_reference(op):
    """The library's dispatcher sends float64 CUDA operands to the reference (trustrepair.engine.ops.routing)."""
    _, reference, _ = OPS[op]
    ops = _f64(_draw((3, 17, 17, 65, 3, 5), seed=7))
    assert not routing.uses_triton("projected_gradient_squares", ops["a"], ops["g"], ops["q_a"], ops["q_s"])
    out = PG.projected_gradient_squares(ops["a"], ops["g"], ops["q_a"], ops["q_s"])
    assert out.dtype == torch.float64 and torch.equal(out, reference(ops))


def _tf32(x):
    """float32 -> nearest TF32 value (ties to even) as float64 on the CPU, by the arithmetic (not bitwise)
    reference."""
    return _launch.round_to_tf32_reference(x.cpu()).double()


def test_round_to_tf32_is_round_to_nearest_even():
    """The in-place pass, and with it the ``round_to_tf32`` the kernels call, against the reference."""
    gen = torch.Generator().manual_seed(17)
    values = torch.randn(3000, generator=gen) * torch.exp2(torch.randint(-100, 100, (3000,), generator=gen).float())
    tiny = torch.randn(300, generator=gen) * 2.0 ** -130  # subnormals: 10 stored bits, spacing 2^-136
    values = torch.cat([values, tiny])
    one = 1.0 + 2.0 ** -10  # a TF32 value with an odd last bit
    ties = [1 + 2.0 ** -11, -(1 + 2.0 ** -11), one + 2.0 ** -11]  # down to 1, down to -1, up to 1 + 2^-9
    specials = [math.inf, -math.inf, math.nan, 3.4028235e38, 0.0, -0.0]
    x = torch.cat([values, torch.tensor(ties + specials)]).to(DEVICE)
    out = _launch.round_to_tf32_(x.clone()).cpu()
    n = values.numel()
    assert torch.equal(out[:n].double(), _tf32(values)), "random values: not the nearest TF32 value"
    assert (out[n - 300:n] != values[n - 300:]).any(), "the subnormals cannot tell rounding from none"
    assert out[n:n + 3].tolist() == [1.0, -1.0, 1.0 + 2.0 ** -9], f"ties not to even: {out[n:n + 3].tolist()}"
    assert out[n + 3:n + 5].tolist() == [math.inf, -math.inf] and out[n + 5].isnan()
    assert out[n + 6] == math.inf, "the largest float32 lies above the largest TF32 value: rounds to infinity"
    signs = torch.signbit(out[n + 7:])
    assert out[n + 7:].tolist() == [0.0, 0.0] and signs.tolist() == [False, True]


def _tf32_algebra(kernel_name, g, a):
    """What the squares kernel computes, in float64 on the given operands (B, T, .)."""
    tiles = torch.bmm(g.transpose(1, 2), a)
    return (tiles * tiles).sum(0)


@pytest.mark.parametrize("kernel_name", ["squares"], ids=["tiles-squares"])
def test_tf32_operands_are_rounded_to_nearest(kernel_name, poison_empty):
    """Under TF32 a kernel must compute its algebra on operands rounded to the nearest TF32 value (as
    cuBLAS does). Rounding moves the result by about 2^-11 relative per operand; float32 accumulation, even
    with tensor cores' round-toward-zero additions over these 37-70 term sums, by about 2^-17 or less. So a
    kernel that rounds sits within 1/8 of the exact value's distance from the rounded-operand result; one
    that passes its operands unrounded sits as far as the exact value, one that truncates them about 3x as
    far (measured with a truncating variant in the interpreter)."""
    ops = _draw((5, 37, 45, 70, 3, 5), seed=19)
    g, a = ops["g"], ops["a"]
    with matmul_precision("high"):
        out = pg.contract_example_tiles(g.transpose(1, 2).contiguous(), a.transpose(1, 2).contiguous())
    _assert_rounded_operand_algebra(kernel_name, ops, out)


def _assert_rounded_operand_algebra(kernel_name, ops, out):
    """``out`` lies within 1/8 of the exact value's distance from the float64 algebra of the operands
    rounded to nearest TF32 (the criterion explained in the test above)."""
    raw = {k: ops[k].double().cpu() for k in ("g", "a")}
    rounded = _tf32_algebra(kernel_name, **{k: _tf32(ops[k]) for k in ("g", "a")})
    exact = _tf32_algebra(kernel_name, **raw)
    err = (out.double().cpu() - rounded).abs().max().item()
    rounding = (exact - rounded).abs().max().item()
    assert rounding > 0, "the inputs cannot tell rounded from unrounded operands"
    assert err <= rounding / 8, (f"{kernel_name}: {err:.3g} from the product of TF32-rounded operands, against "
                                  f"{rounding:.3g} for the exact value (largest entry "
                                  f"{rounded.abs().max().item():.3g}): operands not rounded to nearest")


@pytest.mark.parametrize("kernel_name", ["squares"])
def test_tf32_rounding_by_pass(kernel_name, poison_empty):
    """The launcher's TF32 rounding (a pass over the projected tokens before the tile kernel) gives the
    product of operands rounded to nearest, by the criterion of the test above. Identity bases make the
    projections exact (a TF32 product with one non-zero term per sum rounds like the operand), so the
    rounded-operand algebra is known in float64."""
    ops = _draw((5, 37, 45, 70, 3, 5), seed=23)
    g, a = ops["g"], ops["a"]
    eye_a, eye_s = torch.eye(45, device=DEVICE), torch.eye(70, device=DEVICE)
    with matmul_precision("high"):
        out = pg._squares(a, g, eye_a, eye_s)
    _assert_rounded_operand_algebra(kernel_name, ops, out)


@pytest.mark.parametrize("kernel_name", ["squares"])
@pytest.mark.parametrize("case", [CASES[3], CASES[4]], ids=["dout1", "square65"])  # few: each compiles on CUDA
def test_projection_matches_the_reference(kernel_name, case, poison_empty):
    """The batched projection meets the float32 rule, with TF32 rounding by a pass over its result under
    "high" precision, and gives token-major operands with unit-stride tokens."""
    ops = _draw(case, seed=zlib.crc32(f"projection{kernel_name}{case}".encode()))
    reference = OPS[kernel_name][1]
    truth = reference(_f64(ops))
    for precision in ("highest", "high"):
        with matmul_precision(precision):
            out = pg._squares(ops["a"], ops["g"], ops["q_a"], ops["q_s"])
        name = f"{kernel_name} batched {precision}"
        if precision == "highest":
            assert_within_rule(name, out, truth, reference(ops))
        else:  # TF32 operands: about 2^-11 relative per operand (the rule's own test is test_tf32_within_rule)
            error = (out.double().cpu() - truth.cpu()).abs().max().item()
            assert out.shape == truth.shape and error <= 1e-2 * truth.abs().max().item() + 1e-12, (name, error)
    for basis, x in ((ops["q_a"], ops["a"]), (ops["q_s"], ops["g"])):
        batched = pg.project_tokens(basis, x, torch.float32)
        assert batched.shape == (x.shape[0], x.shape[2], x.shape[1])
        assert batched.shape[2] < 2 or batched.stride(2) == 1, "tokens must stay unit-stride for the tile kernel"
        torch.testing.assert_close(batched, (x @ basis).transpose(1, 2), rtol=1e-5, atol=1e-5)
    for batch, tokens in ((2, 0), (0, 5)):  # empty batches project to empty operands
        empty = ops["a"].new_zeros(batch, tokens, ops["a"].shape[2])
        assert pg.project_tokens(ops["q_a"], empty, torch.float32).shape == (batch, empty.shape[2], tokens)


@pytest.mark.parametrize("kernel_name", ["squares"])
def test_zero_padded_projections_give_the_same_results(kernel_name, poison_empty):
    """The ``pad_widths`` setting: the library hands the kernel zero-padded operands, whose projections
    have the unpadded values in their first rows and zeros after them; the kernel's result, cut to the
    true widths, is that of the unpadded path (the same products with extra zero terms)."""
    from trustrepair.engine.layout import zero_padded

    ops = _draw((3, 9, 17, 13, 3, 5), seed=29)
    plain = pg.project_tokens(ops["q_a"], ops["a"], torch.float32)
    padded = pg.project_tokens(zero_padded(ops["q_a"], dims=2), zero_padded(ops["a"]), torch.float32)
    assert padded.shape == (3, 24, 9) and padded.stride(2) == 1
    torch.testing.assert_close(padded[:, :17], plain, rtol=1e-6, atol=1e-6)
    assert torch.equal(padded[:, 17:], torch.zeros_like(padded[:, 17:]))
    results = {}
    for pad in (False, True):
        with override(pad_widths={torch.device(DEVICE).type: pad}):
            results[pad] = PG.squares_on_triton(ops["a"], ops["g"], ops["q_a"], ops["q_s"])
    assert results[True].shape == results[False].shape == (13, 17)
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-5)


def test_round_to_tf32_takes_permuted_dense_tensors_only():
    """The in-place pass walks dense memory: a permutation of a contiguous tensor rounds like the tensor
    itself; a strided slice (gaps in memory) is refused rather than partly rounded."""
    gen = torch.Generator().manual_seed(29)
    base = torch.randn(6, 5, 7, generator=gen).to(DEVICE)
    permuted = base.clone().permute(1, 0, 2)
    _launch.round_to_tf32_(permuted)
    assert torch.equal(permuted.permute(1, 0, 2).cpu().double(), _tf32(base))
    with pytest.raises(ValueError, match="densely"):
        _launch.round_to_tf32_(base.clone()[:, ::2])


@pytest.mark.parametrize("op", sorted(OPS))
def test_all_tokens_masked_gives_zeros(op, poison_empty):
    ops = _draw((2, 17, 17, 17, 3, 2), seed=11)
    ops["a"].zero_()
    ops["g"].zero_()
    out = OPS[op][0](ops)
    assert torch.equal(out, torch.zeros_like(out)), f"{op}: nonzero output for an all-masked batch"


@pytest.mark.parametrize("op", sorted(OPS))
def test_no_tokens_or_examples(op):
    for batch, tokens in ((2, 0), (0, 5)):
        ops = _draw((2, 5, 17, 3, 2, 2), seed=3)
        ops["a"] = ops["a"].new_zeros(batch, tokens, 17)
        ops["g"] = ops["g"].new_zeros(batch, tokens, 3)
        out = OPS[op][0](ops)
        assert out.shape == ((3, 17) if op == "squares" else (batch, 2)) and not out.any()


def test_split_over_examples_covers_every_example():
    """Batches large enough to give each program several examples agree with the reference."""
    ranges, per_range = pg.example_ranges(7, 17, 17, 32 * 32, torch.device(DEVICE))
    if DEVICE == "cpu":  # interpreter: 2 units, 1 tile -> 4 programs wanted
        assert (ranges, per_range) == (4, 2)
    ops = _draw((7, 5, 17, 17, 2, 1), seed=5)
    kernel, reference, _ = OPS["squares"]
    assert_within_rule("squares", kernel(ops), reference(_f64(ops)), reference(ops))


def _forced_configs():
    """Every configuration the autotuner may pick on a GPU; in the interpreter, each example stepping
    (one at a time, and the flattened loop, which the interpreter runs as written)."""
    if _launch.INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "FLATTEN": flatten})
                for flatten in (False, True)]
    return ALL_CONFIGS


def test_every_configuration_matches_reference(poison_empty):
    ops = _draw((5, 37, 45, 70, 3, 1), seed=13)
    at, gt = ops["a"].transpose(1, 2).contiguous(), ops["g"].transpose(1, 2).contiguous()
    eye_a, eye_s = torch.eye(45, device=DEVICE), torch.eye(70, device=DEVICE)
    operands = {"a": ops["a"], "g": ops["g"], "q_a": eye_a, "q_s": eye_s, "mats": ops["mats"]}
    reference = OPS["squares"][1]
    truth, baseline = reference(_f64(operands)), reference(operands)
    for config in _forced_configs():
        out = pg.contract_example_tiles(gt, at, config=config)
        assert_within_rule(f"{config}", out, truth, baseline)


def test_mixed_operand_dtypes_promote():
    """float32 activations with float64 bases compute in float64, as the reference does."""
    ops = _draw((2, 5, 17, 3, 2, 2), seed=9)
    ops["q_a"] = ops["q_a"].double()
    out = OPS["squares"][0](ops)
    assert out.dtype == torch.float64
    assert_within_rule("squares", out, OPS["squares"][1](_f64(ops)), OPS["squares"][1](ops))


BAD_INPUTS = [
    ("squares", {"a": torch.zeros(2, 3)}, "must be \\(B, T, d_in\\)"),
    ("squares", {"g": torch.zeros(3, 5, 3)}, "same B and T"),
    ("squares", {"q_a": torch.zeros(16, 16)}, "q_a must be \\(17, 17\\)"),
    ("squares", {"a": torch.zeros(2, 5, 17, dtype=torch.int64)}, "a has dtype torch.int64"),
]


@pytest.mark.parametrize("op,replace,message", BAD_INPUTS)
def test_bad_inputs_raise(op, replace, message):
    ops = _draw((2, 5, 17, 3, 2, 2), seed=1)
    ops.update({k: v.to(DEVICE) for k, v in replace.items()})
    with pytest.raises(ValueError, match=message):
        OPS[op][0](ops)


def test_operands_on_two_devices_raise():
    with pytest.raises(ValueError, match="a on cpu, q_s on meta"):
        _launch.check_device(a=torch.zeros(1), q_s=torch.zeros(1, device="meta"))


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter runs only without CUDA here")
def test_interpreter_refuses_bfloat16():
    ops = _draw((2, 5, 17, 3, 2, 2), seed=1)
    with pytest.raises(ValueError, match="interpreter does not compute bfloat16"):
        pg.projected_gradient_squares_triton(ops["a"].bfloat16(), ops["g"], ops["q_a"], ops["q_s"])


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    ops = _draw((2, 5, 17, 3, 2, 2), seed=1)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        pg.projected_gradient_squares_triton(*(ops[k].cpu() for k in ("a", "g", "q_a", "q_s")))


def test_fake_implementations_on_meta_tensors():
    meta = {k: v.to("meta") for k, v in _draw((4, 6, 17, 3, 5, 2), seed=2).items()}
    a, g, q_a, q_s = meta["a"], meta["g"], meta["q_a"], meta["q_s"]
    ops = torch.ops.trustrepair
    assert ops.projected_gradient_squares(a, g, q_a, q_s).shape == (3, 17)
    out = ops.projected_gradient_squares(a.to(torch.bfloat16), g.to(torch.bfloat16), q_a, q_s)
    assert out.shape == (3, 17) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="q_a must be"):
        ops.projected_gradient_squares(a, g, q_s, q_s)


def test_custom_ops_pass_opcheck():
    ops = _draw((2, 3, 17, 3, 2, 2), seed=4)
    a, g, q_a, q_s = ops["a"], ops["g"], ops["q_a"], ops["q_s"]
    checks = [(torch.ops.trustrepair.projected_gradient_squares.default, (a, g, q_a, q_s))]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_traces_under_torch_compile():
    ops = _draw((2, 5, 17, 3, 2, 2), seed=6)

    def fit_and_score(a, g, q_a, q_s):
        return pg.projected_gradient_squares_triton(a, g, q_a, q_s).sum() + (a * 2).sum()

    args = (ops["a"], ops["g"], ops["q_a"], ops["q_s"])
    compiled = torch.compile(fit_and_score, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), fit_and_score(*args))


# ---------------------------------------------------------------------------------------------------
# CUDA only: 16-bit and TF32 operands, sizes of real layers, inductor, the dispatcher.
# ---------------------------------------------------------------------------------------------------

GPU_CASES = [(3, 300, 200, 333, 4, 8), (2, 129, 769, 130, 32, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("case", GPU_CASES, ids=["odd", "wide"])
def test_bfloat16_within_rule(op, case, poison_empty):
    kernel, reference, plain = OPS[op]
    ops = _draw(case, seed=21)
    ops16 = {k: v.to(torch.bfloat16) if k in ("a", "g") else v for k, v in ops.items()}
    truth = reference(_f64(ops16))
    out = kernel(ops16)
    assert out.dtype == torch.float32
    assert_within_rule(op, out, truth, plain(ops16))


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("case", GPU_CASES, ids=["odd", "wide"])
def test_tf32_within_rule(op, case, poison_empty):
    kernel, reference, plain = OPS[op]
    ops = _draw(case, seed=22)
    truth = reference(_f64(ops))
    with matmul_precision("high"):
        out, baseline = kernel(ops), plain(ops)
    assert out.dtype == torch.float32
    assert_within_rule(op, out, truth, baseline)


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(OPS))
def test_float32_larger_sizes(op, poison_empty):
    kernel, reference, _ = OPS[op]
    ops = _draw(GPU_CASES[0], seed=23)
    assert_within_rule(op, kernel(ops), reference(_f64(ops)), reference(ops))


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(OPS))
def test_exact_float32_on_cuda_runs_the_reference(op, poison_empty, monkeypatch):
    """Without TF32 the library's dispatcher runs the reference (cuBLAS beat the kernels' FMA loops): no
    kernel may launch, and the result is the reference's."""
    class NoLaunch:
        def __call__(self, *args, **kwargs):
            raise AssertionError("a Triton kernel was launched for exact float32 on CUDA")

        def __getitem__(self, grid):
            return self

    monkeypatch.setattr(pg, "contract_example_tiles", NoLaunch())
    _, reference, _ = OPS[op]
    ops = _draw(GPU_CASES[1], seed=26)
    with matmul_precision("highest"):
        out = PG.projected_gradient_squares(ops["a"], ops["g"], ops["q_a"], ops["q_s"])
        torch.testing.assert_close(out, reference(ops), rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_inductor_compiles_around_the_ops():
    ops = _draw(GPU_CASES[0], seed=24)

    def fit_and_score(a, g, q_a, q_s):
        return pg.projected_gradient_squares_triton(a * 2, g, q_a, q_s).sum() + (a @ q_a).sum()

    args = (ops["a"], ops["g"], ops["q_a"], ops["q_s"])
    torch.testing.assert_close(torch.compile(fit_and_score, fullgraph=True)(*args), fit_and_score(*args))


@pytest.mark.gpu
def test_dispatch_uses_triton_and_agrees_with_reference(monkeypatch):
    ops = _draw(GPU_CASES[0], seed=25)
    args = (ops["a"], ops["g"], ops["q_a"], ops["q_s"])
    assert routing.triton_enabled(ops["a"])
    with matmul_precision("high"):  # TF32: a tensor-core precision, routed to the kernel
        assert routing.uses_triton("projected_gradient_squares", *args)
        fast = PG.projected_gradient_squares(*args)
        monkeypatch.setenv("TRUSTREPAIR_DISABLE_TRITON", "1")
        assert not routing.triton_enabled(ops["a"])
        slow = PG.projected_gradient_squares(*args)
    assert_within_rule("dispatch", fast, PG.projected_gradient_squares_reference(*(x.double() for x in args)), slow)
