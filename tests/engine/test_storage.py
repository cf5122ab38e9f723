"""Atomic files: a failure at any point leaves the old file whole and no temporary file; round trips;
non-finite floats in JSON; tensors paired with their metadata."""
import json
import math
import os
import stat

import pytest
import torch

from trustrepair.engine import storage


def _write_failing(tmp):
    tmp.write_bytes(b"half")
    raise RuntimeError("interrupted")


def test_atomic_write_removes_the_temporary_file_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        storage.atomic_write(target, _write_failing)
    assert os.listdir(tmp_path) == ["x.bin"] and target.read_bytes() == b"old"


@pytest.mark.parametrize("writer", [
    lambda p: storage.write_bytes(p, b"new"),
    lambda p: storage.write_text(p, "new"),
    lambda p: storage.write_json(p, {"a": 1}),
    lambda p: storage.save_torch(p, {"a": torch.ones(2)}),
    lambda p: storage.save_tensors(p, {"a": torch.ones(2)}),
])
@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_rename_leaves_the_old_file_and_no_temporary_file(writer, failure, tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(storage.os, "replace", broken)
    with pytest.raises(type(failure)):
        writer(target)
    assert os.listdir(tmp_path) == ["f"] and target.read_bytes() == b"old"


def test_round_trips(tmp_path):
    storage.write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    storage.write_text(tmp_path / "t.txt", "é\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é\n"
    payload = {"x": [1, 2.5, "s", None], "y": {"z": True}}
    storage.write_json(tmp_path / "j.json", payload)
    assert json.loads((tmp_path / "j.json").read_text()) == payload
    assert (tmp_path / "j.json").read_text() == json.dumps(payload, indent=2) + "\n"
    obj = {"a": [torch.arange(3)], "b": torch.eye(2)}
    storage.save_torch(tmp_path / "c" / "h.pt", obj)
    back = torch.load(tmp_path / "c" / "h.pt", weights_only=True)
    assert torch.equal(back["a"][0], obj["a"][0]) and torch.equal(back["b"], obj["b"])
    storage.save_tensors(tmp_path / "s.safetensors", {"w": torch.ones(2, 3).t()}, metadata={"k": "v"})
    assert storage.tensor_metadata(tmp_path / "s.safetensors") == {"k": "v"}


def test_json_writes_non_finite_floats_as_null(tmp_path):
    payload = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": math.nan}, "e": 3}
    storage.write_json(tmp_path / "j.json", payload)
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": None, "b": [1.0, None, [None, 2]],
                                                               "c": {"d": None}, "e": 3}


def test_every_writer_gives_the_umask_default_mode(tmp_path):
    """Not mkstemp's 0600: others on a shared server read a report like any file (issue 16 item 16)."""
    from trustrepair.methods.repair_step import RepairDelta

    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
        storage.write_json(tmp_path / "j.json", {})
        storage.write_text(tmp_path / "r.md", "report")
        storage.save_torch(tmp_path / "h.pt", {})
        storage.save_tensors(tmp_path / "s.safetensors", {"w": torch.ones(2)})
        RepairDelta({"w": torch.ones(2)}).save(tmp_path / "d.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o644
    for name in ("j.json", "r.md", "h.pt", "s.safetensors", "d.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_paired_tensors_and_metadata(tmp_path):
    tensors = {"m/a": torch.randn(3, 3), "m/b": torch.randn(2)}
    storage.save_paired(tmp_path, "pair", tensors, {"format": "f/1", "stage": "x", "n": {"m": 4}})
    meta = storage.load_paired_metadata(tmp_path, "pair")
    assert list(meta) == ["format", "save_id", "stage", "n"] and meta["n"] == {"m": 4}
    back = storage.load_paired_tensors(tmp_path, "pair", meta)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert storage.tensor_metadata(tmp_path / "pair.safetensors") == {"format": "f/1", "save_id": meta["save_id"]}
    # An interrupted second save (tensors written, metadata not): the ids differ.
    real = storage.atomic_write

    def stop_before_json(path, write, **kwargs):
        if path.suffix == ".json":
            raise KeyboardInterrupt
        return real(path, write, **kwargs)

    storage_dir = sorted(os.listdir(tmp_path))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "atomic_write", stop_before_json)
        with pytest.raises(KeyboardInterrupt):
            storage.save_paired(tmp_path, "pair", tensors, {"format": "f/1"})
    assert sorted(os.listdir(tmp_path)) == storage_dir
    assert storage.load_paired_tensors(tmp_path, "pair", storage.load_paired_metadata(tmp_path, "pair")) is None
    assert storage.load_paired_metadata(tmp_path, "missing") is None


def test_loaded_tensors_survive_their_file_being_overwritten_in_place(tmp_path):
    """A memory-mapped load dies of SIGBUS when the file is truncated under it (exit -7); run in a child
    process so that a regression fails this test instead of killing pytest."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import torch
        from trustrepair.engine import storage
        from trustrepair.methods.repair_step import RepairDelta
        path = {str(tmp_path / "t.safetensors")!r}
        want = torch.randn(257, 129, generator=torch.Generator().manual_seed(3))
        RepairDelta({{"layer": want}}, {{"beta": 1.0}}).save(path)
        plain, delta = storage.load_tensors(path), RepairDelta.load(path)
        with open(path, "r+b") as f:
            f.truncate(0)
        assert torch.equal(plain["layer"], want) and torch.equal(delta.deltas["layer"], want)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
