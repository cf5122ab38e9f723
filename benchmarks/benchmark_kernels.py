"""The Triton kernel against its PyTorch reference: median time (p20, p80), TFLOP/s, peak memory.

Operations, on one batch of B examples of T tokens through one layer (d_out, d_in), with the FLOP count
used for the rates (2 per multiply-add):

* ``squares``       projected_gradient_squares: 2 B T (d_in^2 + d_out^2 + d_out d_in)  (projections included)
* ``squares_tiles`` the tile kernel alone on pre-projected tokens: 2 B T d_out d_in; its rate against the
                    card's matmul rate is the issue's ">= 50 % of TF32" goal. Under TF32 the tokens are
                    rounded beforehand, as the launcher does (that pass is timed inside ``squares``)

(The Triton kernels for the scoring contractions -- ghost dot products, low-rank ghost dot products,
scores in the eigenbasis -- and the alternative TF32 rounding and projection forms were measured here
and removed; their rows stay in benchmarks/RESULTS.md.)

Providers: ``reference`` (:mod:`trustrepair.engine.ops.projected_gradients`'
``projected_gradient_squares_reference``; for ``squares_tiles`` the same tokens-first algebra, ``bmm``
then square-sum) and ``trustrepair`` (:mod:`trustrepair.kernels.projected_gradients`). Precisions: ``fp32`` (exact float32 products,
``torch.set_float32_matmul_precision("highest")``; the library routes these to the reference on CUDA,
:mod:`trustrepair.engine.ops.routing`), ``tf32`` (``"high"``), ``bf16`` (activations and
gradients in bfloat16; accumulation float32 in both providers). Rates are compared with the card's own
``torch.matmul`` rate for the same precision, measured in the same run (8192^3 products after a warm-up,
see :func:`matmul_rates`).

On CUDA, times are ``triton.testing.do_bench`` medians (L2 flushed before each call). Without CUDA only
the reference runs, on the CPU, timed with ``time.perf_counter`` after a warm-up, and the script says so;
with ``TRITON_INTERPRET=1`` in the environment the kernels run too, in Triton's interpreter, which checks
the code path (its times mean nothing).

    python -m benchmarks.benchmark_kernels                  # Pythia-160M layer shapes, B = 16, T = 512
    python -m benchmarks.benchmark_kernels --quick          # small shapes (a CPU smoke run)
    python -m benchmarks.benchmark_kernels --json out.json  # also write every number
    python -m benchmarks.benchmark_kernels --resources      # no GPU needed: compile every autotuning
                                                            # configuration for sm_90, print registers,
                                                            # spills and whether wgmma was emitted
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from benchmarks.common import matmul_precision, quantiles, run_for, synchronize, time_call, wall_times

from trustrepair.engine.layout import aligned
from trustrepair.engine.ops.checks import uses_tf32
from trustrepair.engine.ops.projected_gradients import projected_gradient_squares_reference

# Pythia-160M's block linears (d_out, d_in), the bias folded in as an input column.
PYTHIA_LAYERS = {"query_key_value": (2304, 769), "dense": (768, 769), "dense_h_to_4h": (3072, 769),
                 "dense_4h_to_h": (768, 3073)}
QUICK_LAYERS = {"odd": (130, 97), "wide": (96, 257)}
OPS = ("squares", "squares_tiles")
PRECISIONS = ("fp32", "tf32", "bf16")
MATMUL_PRECISION = {"fp32": "highest", "tf32": "high", "bf16": "highest"}


def flops(op: str, batch: int, tokens: int, d_out: int, d_in: int) -> int:
    """FLOP (2 per multiply-add) of one call, by the formulas in the module docstring."""
    tiles = 2 * batch * tokens * d_out * d_in
    projections = 2 * batch * tokens * (d_in * d_in + d_out * d_out)
    return {"squares": projections + tiles, "squares_tiles": tiles}[op]


def tile_operand_bytes(batch: int, tokens: int, d_out: int, d_in: int, block_m: int, block_n: int,
                       element_bytes: int) -> int:
    """Bytes of projected tokens the squares tile kernel loads: every (block_m, block_n) output tile reads
    its rows of Gt_b and At_b for all T tokens of every example, so

        B T element_bytes (ceil(d_in / block_n) d_out + ceil(d_out / block_m) d_in).

    Its FLOP per byte (2 B T d_out d_in over this) is about 2 block_m block_n / (element_bytes (block_m +
    block_n)): 32 for 128 x 128 tiles of 4-byte (TF32) operands, 64 in bfloat16. Each tile is one
    short product (inner dimension T) per example, so no larger reuse exists: this traffic comes from L2
    (or HBM) whatever the schedule, and the kernel's rate is at most that intensity times the bandwidth
    that serves it."""
    n_tiles_m, n_tiles_n = -(-d_out // block_m), -(-d_in // block_n)
    return batch * tokens * element_bytes * (n_tiles_n * d_out + n_tiles_m * d_in)


def make_inputs(batch, tokens, d_out, d_in, precision, device, seed=0):
    """Random operands (every fifth token masked to zero, as padding would be) in the precision's dtype,
    activations with aligned rows, as the pipeline hands them over (trustrepair.engine.layout); ``gt`` /
    ``at`` the tokens projected (identity bases' stand-in: the tokens transposed), TF32-rounded when the
    products are TF32, as the launcher hands them to the tile kernel."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    keep = (torch.arange(tokens, device=device) % 5 != 4).view(1, tokens, 1)
    ops = {
        "a": torch.randn(batch, tokens, d_in, generator=gen, device=device) * keep,
        "g": torch.randn(batch, tokens, d_out, generator=gen, device=device) * keep,
        "q_a": torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, device=device))[0],
        "q_s": torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, device=device))[0],
    }
    ops["a"], ops["g"] = aligned(ops["a"], dtype), ops["g"].to(dtype)
    ops["gt"] = ops["g"].transpose(1, 2).contiguous()
    ops["at"] = ops["a"].transpose(1, 2).contiguous()
    ops["rounded"] = uses_tf32(dtype) and (ops["a"].is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if ops["rounded"]:
        from trustrepair.kernels._launch import round_to_tf32_

        round_to_tf32_(ops["gt"])
        round_to_tf32_(ops["at"])
    return ops


def providers(op: str, o: dict) -> dict:
    """name -> zero-argument callable computing ``op`` on the operands ``o``."""
    ref = {
        "squares": lambda: projected_gradient_squares_reference(o["a"], o["g"], o["q_a"], o["q_s"]),
        "squares_tiles": lambda: torch.bmm(o["gt"].float(), o["at"].float().transpose(1, 2)).square_().sum(0),
    }[op]
    out = {"reference": ref}
    if o["a"].is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from trustrepair.kernels import projected_gradients as pg

        out["trustrepair"] = {
            "squares": lambda: pg.projected_gradient_squares_triton(o["a"], o["g"], o["q_a"], o["q_s"]),
            "squares_tiles": lambda: pg.contract_example_tiles(o["gt"], o["at"], operands_rounded=o["rounded"]),
        }[op]
    return out


def sm_clock() -> str:
    """The SM clock of every GPU as nvidia-smi reports it now, or why it could not be read."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({type(exc).__name__}: {exc})"
    return proc.stdout.strip().replace("\n", " / ") or f"unavailable (nvidia-smi exit {proc.returncode})"


def matmul_rates(device: torch.device, size: int = 8192, warmup_s: float = 1.0, window_s: float = 0.1,
                 windows: int = 15) -> dict:
    """TFLOP/s of ``torch.matmul`` on size^3 products (2 size^3 FLOP each): fp32 (exact), tf32 and bf16.

    A GPU idles at a low clock and ramps up only under sustained load: timing a few products straight
    away measured 22 / 147 / 178 TFLOP/s on an H100 that reaches about 51 / 400 / 765. So, per precision:
    products back to back for ``warmup_s``; then ``windows`` windows of about ``window_s`` each, every
    window a run of back-to-back products (``out=`` a fixed buffer, operands rotated over three pairs),
    timed by synchronising the device around it (the launch overhead hides behind the queued work). The
    rate is that of the median window, with the p20 / p80 windows' rates beside it, and nvidia-smi's SM
    clock read while one more window runs, to show whether the card was at speed.

    Returns:
        {precision: {"tflops", "tflops_p20", "tflops_p80", "products_per_window", "sm_clock"}}.
    """
    rates = {}
    for precision in PRECISIONS:
        with matmul_precision(MATMUL_PRECISION[precision]):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            pairs = [(torch.randn(size, size, device=device, dtype=dtype),
                      torch.randn(size, size, device=device, dtype=dtype)) for _ in range(3)]
            out = torch.empty(size, size, device=device, dtype=dtype)
            turn = [0]

            def product():
                x, y = pairs[turn[0] % len(pairs)]
                turn[0] += 1
                torch.matmul(x, y, out=out)

            run_for(product, warmup_s, device)
            calls, seconds = run_for(product, window_s / 2, device)  # the per-product time at speed
            per_window = max(4, round(window_s / (seconds / calls)))

            def window():
                for _ in range(per_window):
                    product()
                synchronize(device)

            times = quantiles(wall_times(window, windows)[0])
            for _ in range(per_window):  # one more window, untimed, under which the clock is read
                product()
            clock = sm_clock() if device.type == "cuda" else "n/a (cpu)"
            synchronize(device)
            flop = 2 * size**3 * per_window
            rates[precision] = {"tflops": flop / times["median"] / 1e12, "tflops_p20": flop / times["p80"] / 1e12,
                                "tflops_p80": flop / times["p20"] / 1e12, "products_per_window": per_window,
                                "sm_clock": clock}
            del pairs, out
    return rates


def format_rates(rates: dict) -> str:
    return ", ".join(f"{k} {v['tflops']:.0f} (p20-p80 {v['tflops_p20']:.0f}-{v['tflops_p80']:.0f}; SM clock "
                     f"{v['sm_clock']})" for k, v in rates.items())


def run_op(op, layer, shape, precision, batch, tokens, device, rates=None) -> dict:
    """Times every provider of one (op, layer shape, precision); returns one record."""
    d_out, d_in = shape
    with matmul_precision(MATMUL_PRECISION[precision]):
        o = make_inputs(batch, tokens, d_out, d_in, precision, device)
        calls = providers(op, o)
        record = {"op": op, "layer": layer, "d_out": d_out, "d_in": d_in, "precision": precision, "B": batch,
                  "T": tokens, "gflop": flops(op, batch, tokens, d_out, d_in) / 1e9}
        results = {}
        for name, fn in calls.items():
            results[name] = fn().double()
            record[name] = time_call(fn, device)
            record[name]["tflops"] = record["gflop"] / record[name]["ms"]
            if rates:
                record[name]["of_matmul"] = record[name]["tflops"] / rates[precision]["tflops"]
        if "trustrepair" in results:
            if op == "squares_tiles":
                record["trustrepair"].update(tile_traffic(record, o["gt"].element_size()))
            ref = results["reference"]
            record["rel_err"] = float((results["trustrepair"] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            record["speedup"] = record["reference"]["ms"] / record["trustrepair"]["ms"]
        del o, calls, results
    return record


def tile_traffic(record: dict, element_bytes: int) -> dict:
    """The configuration the autotuner picked for the tile kernel's last call (the timed ``squares_tiles``)
    and the operand traffic it implies (:func:`tile_operand_bytes`) over the measured median."""
    from trustrepair.kernels import projected_gradients as pg

    config = pg._example_tiles_kernel.best_config
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    moved = tile_operand_bytes(record["B"], record["T"], record["d_out"], record["d_in"], block_m, block_n,
                               element_bytes)
    return {"tile": f"{block_m}x{block_n}x{config.kwargs['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
                    + (" flat" if config.kwargs.get("FLATTEN") else ""),
            "operand_gb": moved / 1e9, "flop_per_byte": record["gflop"] * 1e9 / moved,
            "operand_tb_s": moved / 1e12 / (record["trustrepair"]["ms"] / 1e3)}


def format_table(records: list[dict]) -> str:
    lines = ["| op | layer | prec | reference ms (p20-p80) | trustrepair ms (p20-p80) | speed-up | TFLOP/s | "
             "of matmul | peak MiB ref / ours | rel. err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ref = r["reference"]
        ours = r.get("trustrepair")
        ref_cell = f"{ref['ms']:.3f} ({ref['p20']:.3f}-{ref['p80']:.3f})"
        if ours is None:
            lines.append(f"| {r['op']} | {r['layer']} | {r['precision']} | {ref_cell} | not run (no CUDA) | | "
                         f"{ref['tflops']:.4f} (ref) | | | |")
            continue
        share = f"{100 * ours['of_matmul']:.0f} %" if "of_matmul" in ours else ""
        lines.append(f"| {r['op']} | {r['layer']} | {r['precision']} | {ref_cell} | "
                     f"{ours['ms']:.3f} ({ours['p20']:.3f}-{ours['p80']:.3f}) | {r['speedup']:.2f}x | "
                     f"{ours['tflops']:.1f} | {share} | {ref['peak_mib']:.0f} / {ours['peak_mib']:.0f} | "
                     f"{r['rel_err']:.1e} |")
    return "\n".join(lines)


def run(ops=OPS, precisions=PRECISIONS, layers=None, batch=16, tokens=512, device=None,
        progress=print) -> dict:
    """Every (op, layer, precision) record plus the matmul rates; prints one line per record."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers = layers or PYTHIA_LAYERS
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        progress("no CUDA device: the kernels run in Triton's interpreter (a code-path check; times mean nothing; "
                 "no bfloat16, which the interpreter does not compute correctly)")
        precisions = [p for p in precisions if p != "bf16"]
    elif device.type != "cuda":
        progress("no CUDA device: only the PyTorch reference runs (on the CPU); the Triton kernels need a GPU")
        precisions = [p for p in precisions if p != "tf32"]  # TF32 does not exist on the CPU
    rates = matmul_rates(device) if device.type == "cuda" else None
    if rates:
        progress("torch.matmul TFLOP/s: " + format_rates(rates))
    records = []
    for op in ops:
        for layer, shape in layers.items():
            for precision in precisions:
                record = run_op(op, layer, shape, precision, batch, tokens, device, rates)
                records.append(record)
                ours = record.get("trustrepair")
                progress(f"{op} {layer} {precision}: reference {record['reference']['ms']:.3f} ms"
                         + (f", trustrepair {ours['ms']:.3f} ms ({ours['tflops']:.1f} TFLOP/s)" if ours else ""))
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "matmul_tflops": rates, "records": records}


def resident_programs(registers: int, warps: int, shared_bytes: int) -> int:
    """Programs of one kernel resident on one sm_90 multiprocessor at once: limited by its 64 K registers
    (allocated per warp in units of 256), 228 KiB of shared memory (1 KiB of it reserved per program) and
    64 warps (CUDA occupancy rules for compute capability 9.0)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = 65536 // (per_warp * warps)
    by_shared = (228 * 1024) // (shared_bytes + 1024)
    return min(by_registers, by_shared, 64 // warps, 32)


def resource_report(arch: int = 90) -> list[str]:
    """Compiles every autotuning configuration of the tile kernel for sm_<arch> with Triton's bundled ptxas
    (no GPU needed) and reports registers, stack (spill) bytes and the wgmma / mma.sync instructions in the
    PTX, per operand precision: what the configuration list in trustrepair.kernels was chosen from."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from trustrepair.kernels import projected_gradients as pg

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--resources compiles real kernels: unset TRITON_INTERPRET")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    fn = pg._example_tiles_kernel.fn
    operand_ptrs, fp32_ptrs = ["gt_ptr", "at_ptr"], ["out_ptr"]
    divisible = ["stride_gb", "stride_gi", "stride_ab", "stride_aj", "T"]  # 16-aligned ints
    ones = ["stride_gt", "stride_at"]  # ints equal to 1
    lines = ["| kernel | operands | config | registers | stack bytes | shared KiB | programs per SM | wgmma | "
             "mma.sync |", "|---|---|---|---|---|---|---|---|---|"]
    for operands, element, precision in [("tf32", "fp32", "tf32"), ("bf16", "bf16", "ieee"),
                                         ("fp32", "fp32", "ieee")]:  # as _launch.input_precision decides
        for config in pg.CONFIGS:
            # as the launcher decides: TF32 operands arrive rounded, so the kernel does not round them
            constexprs = {"INPUT_PRECISION": precision, "ACC_DTYPE": tl.float32, "ROUND_OPERANDS": precision != "tf32",
                          **config.kwargs, **{n: 1 for n in ones}}
            kinds = {**{n: f"*{element}" for n in operand_ptrs}, **{n: "*fp32" for n in fp32_ptrs}}
            signature = {n: "constexpr" if n in constexprs else kinds.get(n, "i32") for n in fn.arg_names}
            attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in operand_ptrs + fp32_ptrs + divisible}
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
            found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            ptx = compiled.asm["ptx"]
            shared = compiled.metadata.shared
            resident = resident_programs(int(found.group(1)), config.num_warps, shared) if found else "?"
            shape = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
            lines.append(f"| tiles | {operands} | {shape}, warps={config.num_warps}, stages={config.num_stages} | "
                         f"{found.group(1) if found else '?'} | {found.group(2) if found else '?'} | "
                         f"{shared / 1024:.0f} | {resident} | "
                         f"{len(re.findall('wgmma.mma_async', ptx))} | {len(re.findall(r'mma[.]sync', ptx))} |")
            print(lines[-1], flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, B = 4, T = 64")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--json", help="write every record to this file")
    parser.add_argument("--resources", action="store_true",
                        help="compile every configuration for sm_90 (no GPU needed) and report its resources")
    args = parser.parse_args(argv)
    if args.resources:
        resource_report()
        return
    sizes = dict(layers=QUICK_LAYERS, batch=4, tokens=64) if args.quick else {}
    result = run(ops=args.ops, precisions=args.precisions, **sizes)
    print(format_table(result["records"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
