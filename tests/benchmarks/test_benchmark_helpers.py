"""The benchmark scripts' own arithmetic: what their reports divide by must be right before a GPU run."""
import pytest
import torch

from benchmarks import benchmark_kernels as bk


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
    record = bk.run_op("squares_tiles", "odd", (40, 33), "fp32", 2, 8, device)
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


def _record(op, layer, ours_ms, reference_ms, precision="tf32"):
    return {"op": op, "layer": layer, "precision": precision, "trustrepair": {"ms": ours_ms},
            "reference": {"ms": reference_ms}}


def test_knobs_choose_the_measured_fastest_option_and_apply_it_temporarily():
    from benchmarks import knobs

    from trustrepair.engine.tunables import current, override

    res = {
        "kernels": {"records": [
            _record("squares", "dense", 0.7, 0.6),  # the reference wins: squares leaves TRITON_OPS
            _record("squares", "dense", 0.01, 9.0, precision="bf16"),  # other precisions do not count
        ]},
        "row_alignment": {  # weights: 768 twice, 769 three times
            "768 tf32": {"projection aligned": 1.0, "gram upper 256": 1.0, "gram upper 1024": 0.5, "gram aligned": 0.9,
                         "gram upper 1024 padded": 0.5, "projection padded": 1.0},
            "769 tf32": {"projection aligned": 1.0, "gram upper 256": 1.0, "gram upper 1024": 0.9, "gram aligned": 0.9,
                         "gram upper 1024 padded": 1.5, "projection padded": 1.2},
            "769 bf16": {"projection aligned": 9.0},
        },
        "eigh_schedules": {"workers": 4, "sequential": {"seconds": 2.0}, "streams": {"seconds": 1.0},
                           "streams + host": {"seconds": 0.8}},
    }
    # the defaults this table is written against
    with override(gram_block={"cuda": 256}, pad_widths={"cuda": True}, triton_ops={"projected_gradient_squares"}):
        choices = knobs.choose(res)
        assert choices["GRAM_BLOCK_CUDA"]["value"] == 1024  # 3.7 against 5.0 (256) and 4.5 (full)
        assert choices["PAD_WIDTHS_CUDA"]["value"] is False  # 1.0 + 4.5 + 2.0 + 3.6 = 11.1 against 3.7 + 5.0 = 8.7
        assert choices["EIGH_STREAMS"]["value"] == 4 and choices["EIGH_HOST_BELOW"]["value"] == knobs.EIGH_HOST_WIDTH
        assert choices["EIGH_STREAMS"]["evidence"] == {"sequential": 2.0, "streams": 1.0, "streams + host": 0.8}
        assert choices["TRITON_OPS"]["value"] == frozenset()
        values = knobs.changed(choices)
        assert values["GRAM_BLOCK_CUDA"] == 1024
        before = current()
        with pytest.raises(RuntimeError), knobs.applied(values):
            assert current().gram_block["cuda"] == 1024 and current().gram_block["cpu"] == before.gram_block["cpu"]
            assert current().pad_widths["cuda"] is False
            assert current().eigh_host_below == knobs.EIGH_HOST_WIDTH
            assert "projected_gradient_squares" not in current().triton_ops
            raise RuntimeError("a failed run still restores the defaults")
        assert current() == before
        lines = knobs.describe(choices)
        assert any(line.startswith("- GRAM_BLOCK_CUDA: 1024 (default 256; CHANGE)") for line in lines)
    with pytest.raises(ValueError, match="unknown tunables"), knobs.applied({"BLOCK": 1}):
        pass


def test_knobs_keep_the_default_unless_an_alternative_beats_it_by_the_margin():
    from benchmarks import knobs

    from trustrepair.engine.tunables import override

    def routed(reference_ms):
        res = {"kernels": {"records": [_record("squares", "dense", 1.0, reference_ms)]}}
        return "projected_gradient_squares" in knobs.choose(res)["TRITON_OPS"]["value"]

    with override(triton_ops={"projected_gradient_squares"}):
        assert routed(1.0 - knobs.MARGIN / 2)  # within the margin: the default stays
        assert not routed(1.0 - 2 * knobs.MARGIN)
    with override(triton_ops=frozenset()):
        assert not routed(1.0 + knobs.MARGIN / 2)
        assert routed(1.0 + 3 * knobs.MARGIN)


def test_knobs_without_measurements_choose_nothing():
    from benchmarks import knobs

    assert knobs.choose({}) == {}
    assert knobs.choose({"row_alignment": {"768 tf32": {"projection aligned": 1.0}}}) == {}  # the rest not measured
