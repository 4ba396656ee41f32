"""The committed golden checkpoint fixtures/dp8 is what fixtures/make_fixtures.py writes,
byte for byte, and writing it is deterministic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import zero_ckpt

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "fixtures" / "dp8"


def _make_fixtures():
    path = ROOT / "fixtures" / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def test_fixture_is_deterministic_and_matches_the_committed_one(tmp_path: Path) -> None:
    make = _make_fixtures()
    make.write_dp8(tmp_path / "a")
    make.write_dp8(tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    committed = _files(FIXTURE)
    assert sorted(committed) == sorted(a), "run: python fixtures/make_fixtures.py"
    # The committed manifest predates the manifest's own checksum (its last line now): the
    # rest of a fresh one is byte for byte the committed one, which still loads as it is.
    fresh = a["manifest.json"]
    cut = fresh.rindex(b',\n "manifest_checksum": ')
    assert fresh[cut:].endswith(b'"\n}\n')
    a["manifest.json"] = fresh[:cut] + b"\n}\n"
    differ = [name for name in a if a[name] != committed[name]]
    assert not differ, f"{differ} differ from a fresh run; run: python fixtures/make_fixtures.py"


def test_fixture_shape() -> None:
    with zero_ckpt.open_checkpoint(str(FIXTURE)) as reader:
        m = reader.manifest
    assert m.world_size == 8 and len(m.groups) == 2 and m.step == 120
    l0, l1 = m.layouts()
    assert l0.padding > 0 and 0 < l0.real_numel(7) < l0.partition_numel  # short last rank
    assert [l1.real_numel(r) for r in range(8)] == [4, 4, 4, 4, 4, 2, 0, 0]  # empty last ranks
    assert any(len(l0.fragments_of_param(i)) > 1 for i in range(len(l0.params)))  # split params
    assert {p.dtype for p in m.groups[0].params} == {"bfloat16", "float32"}
    assert m.groups[0].state_keys == ("exp_avg", "exp_avg_sq")
    assert m.model_file is not None
    assert zero_ckpt.verify(str(FIXTURE)).ok
