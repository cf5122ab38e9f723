"""The benchmark scripts' own arithmetic: what their reports divide by must be right before a GPU run."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import benchmark_kernels as bk  # noqa: E402


@pytest.mark.parametrize("d_out,d_in,block_m,block_n", [(768, 769, 128, 128), (2304, 769, 128, 64), (17, 65, 64, 64),
                                                       (1, 1, 32, 32)])
def test_tile_operand_bytes_counts_every_tiles_rows(d_out, d_in, block_m, block_n):
    batch, tokens, element_bytes = 3, 5, 4
    rows = sum(min(block_m, d_out - m) + min(block_n, d_in - n)
               for m in range(0, d_out, block_m) for n in range(0, d_in, block_n))
    assert bk.tile_operand_bytes(batch, tokens, d_out, d_in, block_m, block_n, element_bytes) == \
        batch * tokens * element_bytes * rows


def test_square_tf32_tiles_do_32_flop_per_byte():
    moved = bk.tile_operand_bytes(16, 512, 1024, 1024, 128, 128, 4)
    assert 2 * 16 * 512 * 1024 * 1024 / moved == 32


def test_squares_tiles_record_names_the_tile_and_its_traffic():
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU runs the interpreter
    record = bk.run_op("squares_tiles", "odd", (40, 33), "fp32", 2, 8, 2, 2, device)
    ours = record["trustrepair"]
    block_m, block_n = (int(side) for side in ours["tile"].split("x")[:2])
    assert ours["operand_gb"] * 1e9 == bk.tile_operand_bytes(2, 8, 40, 33, block_m, block_n, 4)
    assert ours["operand_tb_s"] == pytest.approx(ours["operand_gb"] / ours["ms"])
    assert record["rel_err"] < 1e-5


@pytest.mark.parametrize("registers,warps,shared_kib,expected", [
    (210, 8, 96, 1),   # registers: 216 x 32 x 8 = 55,296 of 65,536
    (128, 8, 96, 2),   # registers exactly half the file
    (146, 4, 48, 3),   # 152 x 32 per warp rounds up to 4,864: 3 x 4 x 4,864 <= 65,536 < 4 x ...
    (32, 4, 100, 2),   # shared memory: 2 x (100 + 1) KiB <= 228 KiB
    (16, 1, 0, 32),    # the 32-programs-per-SM cap
])
def test_resident_programs_follow_the_sm90_occupancy_rules(registers, warps, shared_kib, expected):
    assert bk.resident_programs(registers, warps, shared_kib * 1024) == expected
