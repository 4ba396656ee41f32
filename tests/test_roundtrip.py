"""End-to-end round trips: write -> reshard N -> M -> N is byte-identical, consolidation is the
same at every world size and equals the inputs, per-param reads touch only their shards,
and all of it also on ``memory://``."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zero_ckpt  # noqa: E402
from helpers_ckpt import (  # noqa: E402
    STANDARD_SPEC,
    build_groups,
    dir_bytes,
    expected_param,
    fs_bytes,
    memory_rm,
    write_random,
    write_standard,
)
from zero_ckpt.manifest import Manifest, shard_path  # noqa: E402
from zero_ckpt.storage import Location  # noqa: E402

PAIRS = [(8, 16), (16, 3), (1, 7), (7, 1), (5, 5), (8, 1), (3, 64)]
ALIGNS = [1, 4, 64]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@pytest.fixture(scope="module", autouse=True)
def _no_fsync():
    # Scratch output: fsync only costs time here (one test below runs with it on).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZERO_CKPT_FSYNC", "0")
        yield


def _manifest_doc(path: Path | str) -> dict:
    doc = json.loads(Path(path, "manifest.json").read_text())
    doc.pop("created_by")
    return doc


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` directly in ``folder``."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        part = load_file(str(f))
        assert not set(part) & set(out), f"{f.name} repeats tensors"
        out.update(part)
    return out


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN-safe): same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy()
    )


# ----- reshard N -> M -> N --------------------------------------------------------------------


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("n,m", PAIRS, ids=[f"{n}to{m}" for n, m in PAIRS])
def test_reshard_n_m_n_is_byte_identical(tmp_path: Path, n: int, m: int, align: int) -> None:
    src, mid, back = tmp_path / "src", tmp_path / "mid", tmp_path / "back"
    original, _ = write_standard(src, n, align)
    mid_manifest = zero_ckpt.reshard(str(src), str(mid), world_size=m, expected_world_size=n)
    back_manifest = zero_ckpt.reshard(str(mid), str(back), world_size=n, expected_world_size=m)

    # every file, byte for byte (shards, model file, manifest)
    a, b = dir_bytes(src), dir_bytes(back)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if k != "manifest.json" and a[k] != b[k]]
    assert not differ, f"{differ} differ after {n}->{m}->{n}"
    assert _manifest_doc(src) == _manifest_doc(back)
    assert replace(back_manifest, created_by=original.created_by) == original

    # the intermediate checkpoint has the right shape
    assert mid_manifest.world_size == m
    assert sorted(dir_bytes(mid)) == sorted(
        ["manifest.json", "model.safetensors"] + [shard_path(r, m) for r in range(m)]
    )
    for gi, g in enumerate(mid_manifest.groups):
        assert g.partition_numel == original.groups[gi].layout(m).partition_numel
        assert g.align == align
    for ckpt in (src, mid, back):
        report = zero_ckpt.verify(str(ckpt))
        assert report.ok, report.problems


def test_padding_only_ranks_hold_empty_tensors(tmp_path: Path) -> None:
    write_standard(tmp_path / "src", 3, 4)
    m = zero_ckpt.reshard(str(tmp_path / "src"), str(tmp_path / "dst"), world_size=64)
    empties = 0
    for r in range(64):
        tensors = load_file(str(tmp_path / "dst" / shard_path(r, 64)))
        assert sorted(tensors) == ["g0.exp_avg", "g0.exp_avg_sq", "g0.master",
                                   "g1.exp_avg", "g1.exp_avg_sq", "g1.master"]
        for gi, g in enumerate(m.groups):
            real = g.layout(64).real_numel(r)
            for key in g.keys:
                assert tensors[f"g{gi}.{key}"].shape == (real,)
        if all(t.numel() == 0 for t in tensors.values()):
            empties += 1
    # 75 and 30 elements at align 4 over 64 ranks: ranks 19.. hold only padding
    assert empties == 64 - 19


def test_concatenated_shards_are_the_unpadded_flat_buffer(tmp_path: Path) -> None:
    _, inputs = write_standard(tmp_path / "src", 5, 4)
    shards = [load_file(str(tmp_path / "src" / shard_path(r, 5))) for r in range(5)]
    for gi, group in enumerate(inputs["groups"]):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            flat = torch.cat([s[f"g{gi}.{key}"] for s in shards])
            want = torch.cat([states[key].reshape(-1) for states in group.values()])
            if key == "master":
                want = want.to(torch.float32)
            assert _bitwise_equal(flat, want), (gi, key)


def test_reshard_with_fsync_on_and_one_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZERO_CKPT_FSYNC", "1")
    write_standard(tmp_path / "src", 4, 1)
    zero_ckpt.reshard(str(tmp_path / "src"), str(tmp_path / "mid"), world_size=3, workers=1, chunk_bytes=8)
    zero_ckpt.reshard(str(tmp_path / "mid"), str(tmp_path / "back"), world_size=4, workers=3,
                      chunk_bytes=12, fsync=True)
    assert dir_bytes(tmp_path / "src").keys() == dir_bytes(tmp_path / "back").keys()
    a, b = dir_bytes(tmp_path / "src"), dir_bytes(tmp_path / "back")
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {
        k: v for k, v in b.items() if k != "manifest.json"
    }


def test_reshard_progress_reaches_total(tmp_path: Path) -> None:
    write_standard(tmp_path / "src", 4, 4)
    calls: list[tuple[int, int]] = []
    lock = threading.Lock()

    def progress(done: int, total: int) -> None:
        with lock:
            calls.append((done, total))

    zero_ckpt.reshard(str(tmp_path / "src"), str(tmp_path / "dst"), world_size=3, progress=progress,
                      chunk_bytes=16)
    assert calls[0][0] == 0
    total = calls[0][1]
    assert total > 0 and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_empty_groups_and_zero_numel_groups_round_trip(tmp_path: Path) -> None:
    groups = build_groups([[("a", (5,))], [("z", (0,))]], seed=1) + [{}]
    zero_ckpt.write_checkpoint(str(tmp_path / "src"), groups, world_size=3, align=4)
    zero_ckpt.reshard(str(tmp_path / "src"), str(tmp_path / "mid"), world_size=5)
    zero_ckpt.reshard(str(tmp_path / "mid"), str(tmp_path / "back"), world_size=3)
    a, b = dir_bytes(tmp_path / "src"), dir_bytes(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a if k != "manifest.json")
    assert _manifest_doc(tmp_path / "src") == _manifest_doc(tmp_path / "back")
    zero_ckpt.consolidate(str(tmp_path / "mid"), str(tmp_path / "out"), include_optimizer=True)
    out = _load_dir(tmp_path / "out")
    assert _bitwise_equal(out["a"], groups[0]["a"]["master"])
    assert out["z"].shape == (0,) and out["z.exp_avg"].shape == (0,)
    assert zero_ckpt.verify(str(tmp_path / "mid")).ok


def test_checkpoint_without_groups(tmp_path: Path) -> None:
    zero_ckpt.write_checkpoint(str(tmp_path / "src"), [], world_size=2)
    zero_ckpt.reshard(str(tmp_path / "src"), str(tmp_path / "mid"), world_size=3)
    res = zero_ckpt.consolidate(str(tmp_path / "mid"), str(tmp_path / "out"))
    assert res.files == ["model.safetensors"] and load_file(str(tmp_path / "out" / "model.safetensors")) == {}
    assert zero_ckpt.verify(str(tmp_path / "mid")).ok


def test_recorded_shard_paths_are_followed(tmp_path: Path) -> None:
    """Shards renamed in the manifest (and listed out of rank order) are read where it says."""
    src = tmp_path / "src"
    _, inputs = write_standard(src, 3, 1)
    path = src / "manifest.json"
    doc = json.loads(path.read_text())
    doc.pop("manifest_checksum")  # an intended edit: the manifest's own checksum goes with it
    (src / "data").mkdir()
    for shard in doc["shards"]:
        new = f"data/part-{shard['rank']}.st"
        (src / shard["path"]).rename(src / new)
        shard["path"] = new
    doc["shards"].reverse()
    path.write_text(json.dumps(doc))
    assert zero_ckpt.verify(str(src)).ok
    zero_ckpt.reshard(str(src), str(tmp_path / "canon"), world_size=3)
    zero_ckpt.write_checkpoint(str(tmp_path / "fresh"), world_size=3, align=1, **inputs)
    a, b = dir_bytes(tmp_path / "fresh"), dir_bytes(tmp_path / "canon")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a if k != "manifest.json")
    zero_ckpt.consolidate(str(src), str(tmp_path / "out"), dtype="float32")
    assert _bitwise_equal(_load_dir(tmp_path / "out")["head.w"], expected_param(inputs, "head.w"))
    with zero_ckpt.open_checkpoint(str(src)) as reader:
        assert _bitwise_equal(reader.read("enc.w", "exp_avg"), expected_param(inputs, "enc.w", "exp_avg"))


def test_parallel_segments_of_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny segments: several workers fill one file with positioned writes, tiny chunks."""
    from zero_ckpt import transfer

    monkeypatch.setattr(transfer, "_SEGMENT_BYTES", 16)
    write_standard(tmp_path / "src", 2, 1)
    zero_ckpt.reshard(str(tmp_path / "src"), str(tmp_path / "mid"), world_size=3, workers=4, chunk_bytes=6)
    zero_ckpt.reshard(str(tmp_path / "mid"), str(tmp_path / "back"), world_size=2, workers=4, chunk_bytes=4)
    a, b = dir_bytes(tmp_path / "src"), dir_bytes(tmp_path / "back")
    assert all(a[k] == b[k] for k in a if k != "manifest.json")
    assert _manifest_doc(tmp_path / "src") == _manifest_doc(tmp_path / "back")
    zero_ckpt.consolidate(str(tmp_path / "mid"), str(tmp_path / "o1"), include_optimizer=True, workers=4, chunk_bytes=6)
    monkeypatch.undo()
    zero_ckpt.consolidate(str(tmp_path / "src"), str(tmp_path / "o2"), include_optimizer=True)
    assert dir_bytes(tmp_path / "o1") == dir_bytes(tmp_path / "o2")
    assert zero_ckpt.verify(str(tmp_path / "mid"), chunk_bytes=5).ok


# ----- consolidate -----------------------------------------------------------------------------


def test_consolidate_is_the_same_at_every_world_size(tmp_path: Path) -> None:
    _, inputs = write_standard(tmp_path / "ws8", 8, 4)
    outs = {}
    for ws in (1, 3, 7, 16, 64):
        zero_ckpt.reshard(str(tmp_path / "ws8"), str(tmp_path / f"ws{ws}"), world_size=ws)
    for ws in (1, 3, 7, 8, 16, 64):
        res = zero_ckpt.consolidate(str(tmp_path / f"ws{ws}"), str(tmp_path / f"out{ws}"))
        assert res.files == ["model.safetensors"]
        outs[ws] = tmp_path / f"out{ws}"
    ref = _load_dir(outs[8])
    ref_bytes = dir_bytes(outs[8])
    for ws, folder in outs.items():
        _assert_same_tensors(_load_dir(folder), ref)
        assert dir_bytes(folder) == ref_bytes, f"consolidated output at world size {ws} differs"


@pytest.mark.parametrize("align", ALIGNS)
def test_consolidate_equals_inputs_cast_to_recorded_dtype(tmp_path: Path, align: int) -> None:
    manifest, inputs = write_standard(tmp_path / "src", 7, align)
    res = zero_ckpt.consolidate(str(tmp_path / "src"), str(tmp_path / "out"))
    out = _load_dir(tmp_path / "out")
    params = {p.name: p for g in manifest.groups for p in g.params}
    assert sorted(out) == sorted([*params, *inputs["model_state"]])
    assert res.files == ["model.safetensors"]
    assert res.total_bytes == (tmp_path / "out" / "model.safetensors").stat().st_size
    for name, p in params.items():
        want = expected_param(inputs, name).to(_DTYPES[p.dtype])
        assert out[name].dtype == _DTYPES[p.dtype]
        assert tuple(out[name].shape) == p.shape
        assert _bitwise_equal(out[name], want), name
    assert out["enc.w"].dtype == torch.bfloat16 and out["enc.b"].dtype == torch.float32
    # model-file tensors carried unchanged (no dtype given)
    for name, t in inputs["model_state"].items():
        assert _bitwise_equal(out[name], t), name


def test_consolidate_float32_gives_exact_masters(tmp_path: Path) -> None:
    _, inputs = write_standard(tmp_path / "src", 3, 4)
    zero_ckpt.consolidate(str(tmp_path / "src"), str(tmp_path / "out"), dtype="float32")
    out = _load_dir(tmp_path / "out")
    for group in inputs["groups"]:
        for name, states in group.items():
            assert out[name].dtype == torch.float32
            assert _bitwise_equal(out[name], states["master"]), name
    assert _bitwise_equal(out["bn.running_mean"], inputs["model_state"]["bn.running_mean"])
    # integer buffers are never cast
    assert _bitwise_equal(out["bn.num_batches_tracked"], inputs["model_state"]["bn.num_batches_tracked"])


def test_consolidate_bfloat16_casts_every_float(tmp_path: Path) -> None:
    _, inputs = write_standard(tmp_path / "src", 5, 1)
    zero_ckpt.consolidate(str(tmp_path / "src"), str(tmp_path / "out"), dtype="bfloat16")
    out = _load_dir(tmp_path / "out")
    for group in inputs["groups"]:
        for name, states in group.items():
            assert _bitwise_equal(out[name], states["master"].to(torch.bfloat16)), name
    assert _bitwise_equal(out["bn.running_mean"], inputs["model_state"]["bn.running_mean"].to(torch.bfloat16))
    assert out["bn.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("ws", [1, 4, 16])
def test_consolidate_include_optimizer_holds_every_state_exactly(tmp_path: Path, ws: int) -> None:
    manifest, inputs = write_standard(tmp_path / "src", ws, 4)
    res = zero_ckpt.consolidate(str(tmp_path / "src"), str(tmp_path / "out"), include_optimizer=True)
    assert res.files == ["model.safetensors", "optimizer.safetensors", "optimizer.json"]
    opt = load_file(str(tmp_path / "out" / "optimizer.safetensors"))
    expected_names = []
    for group in inputs["groups"]:
        for name, states in group.items():
            for key, t in states.items():
                expected_names.append(f"{name}.{key}")
                got = opt[f"{name}.{key}"]
                assert _bitwise_equal(got, t), f"{name}.{key}"
    assert sorted(opt) == sorted(expected_names)
    meta = json.loads((tmp_path / "out" / "optimizer.json").read_text())
    assert meta["master_dtype"] == "float32"
    assert [g["params"] for g in meta["groups"]] == [[n for n, _ in g] for g in STANDARD_SPEC]
    assert [g["hyperparams"] for g in meta["groups"]] == inputs["hyperparams"]
    assert [g["scalars"] for g in meta["groups"]] == [{"step": 120}, {"step": 120}]
    assert [g["state_keys"] for g in meta["groups"]] == [["master", "exp_avg", "exp_avg_sq"]] * 2
    assert meta["extra"] == {"averager": {"step": 120}}


@pytest.mark.parametrize("max_shard_size", [64, 200, 300])
def test_consolidate_max_shard_size_splits_with_index(tmp_path: Path, max_shard_size: int) -> None:
    _, inputs = write_standard(tmp_path / "src", 4, 4)
    zero_ckpt.consolidate(str(tmp_path / "src"), str(tmp_path / "whole"))
    whole = _load_dir(tmp_path / "whole")
    res = zero_ckpt.consolidate(str(tmp_path / "src"), str(tmp_path / "out"), max_shard_size=max_shard_size)
    out_dir = tmp_path / "out"
    files = sorted(p.name for p in out_dir.iterdir())
    st_files = [f for f in files if f.endswith(".safetensors")]
    k = len(st_files)
    assert k > 1
    assert st_files == [f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)]
    assert files == sorted([*st_files, "model.safetensors.index.json"])
    assert res.files == [*st_files, "model.safetensors.index.json"]
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(whole)
    total = 0
    for f in st_files:
        part = load_file(str(out_dir / f))
        part_bytes = 0
        for name, t in part.items():
            assert index["weight_map"][name] == f
            assert _bitwise_equal(t, whole[name]), name
            part_bytes += t.numel() * t.element_size()
        # a file exceeds the limit only when it holds one tensor larger than the limit
        assert part_bytes <= max_shard_size or len(part) == 1
        total += part_bytes
    assert index["metadata"]["total_size"] == total
    assert total == sum(t.numel() * t.element_size() for t in whole.values())
    _assert_same_tensors(_load_dir(out_dir), whole)


def test_consolidate_max_shard_size_with_optimizer(tmp_path: Path) -> None:
    _, inputs = write_standard(tmp_path / "src", 3, 1)
    zero_ckpt.consolidate(str(tmp_path / "src"), str(tmp_path / "out"), max_shard_size=256,
                          include_optimizer=True)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors.index.json" in names and "optimizer.safetensors.index.json" in names
    assert "optimizer.json" in names
    opt_index = json.loads((tmp_path / "out" / "optimizer.safetensors.index.json").read_text())
    opt = {}
    for f in sorted(set(opt_index["weight_map"].values())):
        assert f.startswith("optimizer-")
        opt.update(load_file(str(tmp_path / "out" / f)))
    for group in inputs["groups"]:
        for name, states in group.items():
            for key, t in states.items():
                assert _bitwise_equal(opt[f"{name}.{key}"], t)
    assert sorted(opt) == sorted(opt_index["weight_map"])


# ----- aliases (tied weights) ------------------------------------------------------------------
# write_checkpoint has no alias argument; the public Manifest dataclasses are used to add one
# to a written checkpoint (the manifest is not covered by shard checksums).


def _add_alias(ckpt: Path, name: str, alias: str) -> None:
    path = ckpt / "manifest.json"
    m = Manifest.from_json(path.read_text())
    groups = tuple(
        replace(g, params=tuple(replace(p, aliases=(alias,)) if p.name == name else p for p in g.params))
        for g in m.groups
    )
    path.write_text(replace(m, groups=groups).validate().to_json())


def test_aliases_survive_reshard_and_are_consolidated_and_readable(tmp_path: Path) -> None:
    _, inputs = write_standard(tmp_path / "src", 4, 4)
    _add_alias(tmp_path / "src", "head.w", "lm_head.weight")
    assert zero_ckpt.verify(str(tmp_path / "src")).ok
    zero_ckpt.reshard(str(tmp_path / "src"), str(tmp_path / "mid"), world_size=3)
    zero_ckpt.reshard(str(tmp_path / "mid"), str(tmp_path / "back"), world_size=4)
    assert _manifest_doc(tmp_path / "back") == _manifest_doc(tmp_path / "src")
    doc = _manifest_doc(tmp_path / "mid")
    assert doc["groups"][1]["params"][0]["aliases"] == ["lm_head.weight"]
    # tied weights are written once by default (save_pretrained-style), every name on request
    zero_ckpt.consolidate(str(tmp_path / "mid"), str(tmp_path / "once"), dtype="float32")
    assert "lm_head.weight" not in _load_dir(tmp_path / "once")
    zero_ckpt.consolidate(str(tmp_path / "mid"), str(tmp_path / "out"), dtype="float32", all_tied_names=True)
    out = _load_dir(tmp_path / "out")
    want = expected_param(inputs, "head.w")
    assert _bitwise_equal(out["head.w"], want) and _bitwise_equal(out["lm_head.weight"], want)
    with zero_ckpt.open_checkpoint(str(tmp_path / "mid")) as reader:
        assert reader.params["lm_head.weight"] == reader.params["head.w"]
        assert _bitwise_equal(reader.read("lm_head.weight", "exp_avg"), expected_param(inputs, "head.w", "exp_avg"))


# ----- open_checkpoint ---------------------------------------------------------------------------


class _ReadRecorder:
    """Records which files ``Location.read_into`` / ``read_range`` touch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data: set[str] = set()
        self.any: set[str] = set()
        self._lock = threading.Lock()
        orig_into, orig_range = Location.read_into, Location.read_range
        recorder = self

        def read_into(loc, rel, offset, view):
            with recorder._lock:
                recorder.data.add(rel)
                recorder.any.add(rel)
            return orig_into(loc, rel, offset, view)

        def read_range(loc, rel, start, end):
            with recorder._lock:
                recorder.any.add(rel)
            return orig_range(loc, rel, start, end)

        monkeypatch.setattr(Location, "read_into", read_into)
        monkeypatch.setattr(Location, "read_range", read_range)

    def clear(self) -> None:
        self.data.clear()
        self.any.clear()


@pytest.mark.parametrize("ws,align", [(1, 1), (3, 4), (8, 4), (16, 1), (64, 64)])
def test_reader_reads_every_param_and_key_touching_only_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ws: int, align: int
) -> None:
    manifest, inputs = write_standard(tmp_path / "src", ws, align)
    recorder = _ReadRecorder(monkeypatch)
    with zero_ckpt.open_checkpoint(str(tmp_path / "src")) as reader:
        assert sorted(reader.params) == sorted(p.name for g in manifest.groups for p in g.params)
        for gi, g in enumerate(manifest.groups):
            layout = g.layout(ws)
            for p in g.params:
                assert reader.keys(p.name) == ("master", "exp_avg", "exp_avg_sq")
                shards = {shard_path(r, ws) for r, _, _ in layout.locate(p.offset, p.offset + p.numel)}
                for key in reader.keys(p.name):
                    recorder.clear()
                    got = reader.read(p.name, key)
                    want = expected_param(inputs, p.name, key)
                    if key == "master":
                        want = want.to(torch.float32)
                    assert _bitwise_equal(got, want), (p.name, key)
                    assert recorder.data == shards, (p.name, key)
                    assert recorder.any <= shards, (p.name, key)
        # cast on request
        got = reader.read("enc.w", dtype="bfloat16")
        assert _bitwise_equal(got, expected_param(inputs, "enc.w").to(torch.bfloat16))
        assert reader.read("enc.empty").shape == (4, 0)


def test_reader_reads_resharded_checkpoints(tmp_path: Path) -> None:
    _, inputs = write_standard(tmp_path / "src", 5, 4)
    for ws in (2, 13):
        dst = tmp_path / f"ws{ws}"
        zero_ckpt.reshard(str(tmp_path / "src"), str(dst), world_size=ws)
        with zero_ckpt.open_checkpoint(str(dst)) as reader:
            for group in inputs["groups"]:
                for name, states in group.items():
                    for key, t in states.items():
                        assert _bitwise_equal(reader.read(name, key), t.to(torch.float32) if key == "master" else t)


def test_reader_unknown_name_and_key(tmp_path: Path) -> None:
    write_standard(tmp_path / "src", 2, 1)
    with zero_ckpt.open_checkpoint(str(tmp_path / "src")) as reader:
        with pytest.raises(KeyError, match="has no parameter 'enc.weight'"):
            reader.read("enc.weight")
        with pytest.raises(KeyError, match="has no 'momentum_buffer'"):
            reader.read("enc.w", "momentum_buffer")


# ----- property: random sizes and world sizes ---------------------------------------------------


_sizes = st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=4), min_size=1, max_size=2)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=_sizes, n=st.integers(1, 9), m=st.integers(1, 9), align=st.sampled_from([1, 2, 4, 8]))
def test_property_reshard_identity_and_consolidate_equality(sizes, n, m, align) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, groups = write_random(root / "a", sizes, n, align)
        zero_ckpt.reshard(str(root / "a"), str(root / "b"), world_size=m)
        zero_ckpt.reshard(str(root / "b"), str(root / "c"), world_size=n)
        a, c = dir_bytes(root / "a"), dir_bytes(root / "c")
        assert sorted(a) == sorted(c)
        assert all(a[k] == c[k] for k in a if k != "manifest.json")
        assert _manifest_doc(root / "a") == _manifest_doc(root / "c")
        zero_ckpt.consolidate(str(root / "a"), str(root / "ca"), include_optimizer=True)
        zero_ckpt.consolidate(str(root / "b"), str(root / "cb"), include_optimizer=True)
        assert dir_bytes(root / "ca") == dir_bytes(root / "cb")
        model = load_file(str(root / "cb" / "model.safetensors"))
        opt = load_file(str(root / "cb" / "optimizer.safetensors"))
        for group in groups:
            for name, states in group.items():
                assert _bitwise_equal(model[name], states["master"])
                for key, t in states.items():
                    assert _bitwise_equal(opt[f"{name}.{key}"], t)
        assert zero_ckpt.verify(str(root / "b")).ok


# ----- memory:// ---------------------------------------------------------------------------------


def test_memory_filesystem_round_trip() -> None:
    base = f"memory://ckpt-{uuid.uuid4().hex}"
    a, b, c, out = f"{base}/a", f"{base}/b", f"{base}/c", f"{base}/out"
    try:
        original, inputs = write_standard(a, 8, 4)
        zero_ckpt.reshard(a, b, world_size=3, expected_world_size=8)
        back = zero_ckpt.reshard(b, c, world_size=8)
        fa, fc = fs_bytes(a), fs_bytes(c)
        assert sorted(fa) == sorted(fc)
        assert all(fa[k] == fc[k] for k in fa if k != "manifest.json")
        assert replace(back, created_by=original.created_by) == original
        for url in (a, b, c):
            report = zero_ckpt.verify(url)
            assert report.ok, report.problems
        res = zero_ckpt.consolidate(b, out, dtype="float32", include_optimizer=True)
        assert res.files == ["model.safetensors", "optimizer.safetensors", "optimizer.json"]
        files = fs_bytes(out)
        assert sorted(files) == sorted(res.files)
        with tempfile.TemporaryDirectory() as tmp:
            # compare with the same consolidation on local disk, byte for byte
            zero_ckpt.consolidate(a, tmp + "/out", dtype="float32", include_optimizer=True)
            assert dir_bytes(tmp + "/out") == files
            model = load_file(tmp + "/out/model.safetensors")
        for group in inputs["groups"]:
            for name, states in group.items():
                assert _bitwise_equal(model[name], states["master"])
        with zero_ckpt.open_checkpoint(b) as reader:
            for group in inputs["groups"]:
                for name, states in group.items():
                    for key, t in states.items():
                        assert _bitwise_equal(reader.read(name, key), t)
    finally:
        memory_rm(base)
    assert fs_bytes(base) == {}
