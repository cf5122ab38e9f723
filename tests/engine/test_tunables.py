"""trustrepair.engine.tunables: one typed, validated home for the engine's settings, overridden in a block."""
import pytest
import torch

from trustrepair.engine import layout, tunables
from trustrepair.engine.tunables import FIELDS, Tunables, current, override


def test_defaults_are_the_documented_ones():
    settings = current()
    assert settings == Tunables()
    assert (settings.chunk_elements, settings.slab_elements, settings.tile_elements) == (1 << 24, 1 << 17, 1 << 20)
    assert settings.memory_cost_per_entry == 128
    assert dict(settings.gram_block) == {"cpu": 1024, "cuda": 1024}
    assert dict(settings.pad_widths) == {"cpu": False, "cuda": True}
    assert settings.triton_ops == frozenset({"projected_gradient_squares"})
    assert (settings.eigh_streams, settings.eigh_host_below) == (4, 0)
    assert (settings.lowrank_oversample, settings.lowrank_power_iterations) == (10, 2)


def test_every_field_is_documented():
    source = open(tunables.__file__).read()
    for name in FIELDS:
        declaration = source.index(f"    {name}:")
        assert source[declaration:].split("\n", 2)[1].strip().startswith('"""'), f"{name} has no docstring"
        assert "benchmarks/RESULTS.md, decisions" in source[declaration:source.index('"""', source.index(
            '"""', declaration) + 3)], f"{name}'s docstring does not point to the decisions"


def test_unknown_name_fails_at_once_naming_the_valid_ones():
    before = current()
    with pytest.raises(TypeError, match="chunk_elemnts") as error:
        with override(chunk_elemnts=5):
            pytest.fail("the block must not run")
    assert "chunk_elements" in str(error.value) and "pad_widths" in str(error.value)
    assert current() is before


@pytest.mark.parametrize("changes", [
    {"chunk_elements": 0}, {"chunk_elements": 1.5}, {"chunk_elements": True}, {"eigh_host_below": -1},
    {"gram_block": {"cuda": 0}}, {"gram_block": {"cuda": "big"}}, {"pad_widths": {"cuda": 1}},
    {"pad_widths": ["cuda"]}, {"triton_ops": "projected_gradient_squares"}, {"triton_ops": {"unknown_op"}},
    {"lowrank_power_iterations": -2},
])
def test_bad_values_raise_value_error(changes):
    before = current()
    with pytest.raises(ValueError):
        with override(**changes):
            pass
    assert current() is before
    with pytest.raises(ValueError):
        Tunables(**{**{k: getattr(before, k) for k in FIELDS}, **changes})


def test_per_device_mappings_are_merged():
    with override(pad_widths={"cuda": False}, gram_block={"mps": 64}) as settings:
        assert settings is current()
        assert dict(current().pad_widths) == {"cpu": False, "cuda": False}
        assert dict(current().gram_block) == {"cpu": 1024, "cuda": 1024, "mps": 64}
        with override(pad_widths={"cpu": True}):
            assert dict(current().pad_widths) == {"cpu": True, "cuda": False}
        assert dict(current().pad_widths) == {"cpu": False, "cuda": False}
    assert dict(current().pad_widths) == {"cpu": False, "cuda": True}


def test_settings_are_immutable():
    settings = current()
    with pytest.raises(AttributeError):
        settings.chunk_elements = 1
    with pytest.raises(TypeError):
        settings.pad_widths["cpu"] = True


def test_restored_on_error():
    before = current()
    with pytest.raises(RuntimeError, match="inside"):
        with override(chunk_elements=7, triton_ops=frozenset()):
            assert current().chunk_elements == 7
            raise RuntimeError("inside")
    assert current() is before


def test_the_library_reads_the_override():
    """layout, lowrank and the ops read the settings when they run."""
    from trustrepair.engine.lowrank import low_rank_factors
    from trustrepair.engine.ops.blocking import row_chunks

    cpu = torch.device("cpu")
    assert not layout.pads_widths(cpu)
    with override(pad_widths={"cpu": True}):
        assert layout.pads_widths(cpu)
    assert len(row_chunks(10, 1)) == 1
    with override(chunk_elements=3):
        assert [s.stop - s.start for s in row_chunks(10, 1)] == [3, 3, 3, 1]
    m = torch.randn(1, 40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    default = low_rank_factors(m, 2)
    with override(lowrank_oversample=40):  # the sketch covers the matrix: the exact truncated SVD
        exact = low_rank_factors(m, 2)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(exact[0] @ exact[1], (u[..., :2] * s[..., None, :2]) @ vh[..., :2, :])
    assert not torch.equal(default[0] @ default[1], exact[0] @ exact[1])
