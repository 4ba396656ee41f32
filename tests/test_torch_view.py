"""Plain torch checkpoints read in place: ``zero_ckpt.formats.torch_files`` opens a folder with
``optimizer.pt`` + ``model.safetensors``/``model.pt`` (+ ``param_names.json``), or one ``.pt``
training checkpoint, as a streaming :class:`~zero_ckpt.view.SourceView` (no torch, no whole-file
read). Converting through the view writes the same shards, byte for byte, and the same manifest
(but for ``converted_from``) as the torch loader (``import_torch_files``); what the view does
not take is refused by ``open_view`` and still converted by the loader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_torch_format import NAMES, OPTIMIZERS, make_net, make_optimizer, train, trained
from zero_ckpt.conversion import convert
from zero_ckpt.errors import CheckpointError, CorruptShardError
from zero_ckpt.formats import registry
from zero_ckpt.formats.torch_files.reading import ALIGN, torch_view
from zero_ckpt.formats.torch_optim import TorchStateDictError, import_torch_files
from zero_ckpt.storage import open_location

ROOT = Path(__file__).resolve().parents[1]


def folder(tmp_path: Path, osd: dict, msd: dict, *, names: bool = True, model_pt: bool = False,
           name: str = "src") -> Path:
    src = tmp_path / name
    src.mkdir()
    torch.save(osd, src / "optimizer.pt")
    if model_pt:
        torch.save(msd, src / "model.pt")
    else:
        save_file({k: v.contiguous() for k, v in msd.items()}, str(src / "model.safetensors"))
    if names:
        (src / "param_names.json").write_text(json.dumps(NAMES))
    return src


def view_of(src: Path):
    with open_location(str(src)) as loc:
        return registry.open_view(loc)


def by_view(manifest) -> bool:
    """Whether a conversion went through the view (the loader records no ``created_by``)."""
    return manifest.extra["converted_from"].get("created_by") == "torch.save"


def assert_same_conversion(tmp_path: Path, src: Path, world_size: int, tag: str) -> None:
    """The loader's and the view's conversions: same manifest but for ``converted_from``
    (and the manifest checksum over it), same bytes in every file."""
    a = import_torch_files(str(src), str(tmp_path / f"loader-{tag}"), world_size=world_size)
    b = convert(str(src), str(tmp_path / f"view-{tag}"), world_size=world_size).manifest
    assert by_view(b) and not by_view(a)
    ja, jb = json.loads(a.to_json()), json.loads(b.to_json())
    for j in (ja, jb):
        j["extra"].pop("converted_from")
        j.pop("manifest_checksum", None)
    assert ja == jb
    files = [f.path for f in (*a.shards, *((a.model_file,) if a.model_file else ()))]
    assert files
    for rel in files:
        assert (tmp_path / f"loader-{tag}" / rel).read_bytes() == (tmp_path / f"view-{tag}" / rel).read_bytes(), rel


VIEWABLE = [k for k in OPTIMIZERS if k != "adagrad"]


@pytest.mark.parametrize("kind", VIEWABLE)
def test_view_conversion_equals_the_loader(tmp_path: Path, kind: str) -> None:
    osd, msd, _ = trained(kind)
    src = folder(tmp_path, osd, msd)
    view = view_of(src)
    assert view.format == "torch"
    assert view.manifest.groups[0].scalars == ({} if kind == "sgd_momentum" else {"step": 3})
    # head.frozen (no grad, no state) is module-only, as the loader stores it
    assert "head.frozen" in {t.name for t in view.model}
    for ws in (1, 3, 8):
        assert_same_conversion(tmp_path, src, ws, f"{kind}-{ws}")


def test_adagrad_constructor_state_falls_back_to_the_loader(tmp_path: Path) -> None:
    # Adagrad gives the never-stepped head.frozen a step 0 and a constant sum: deciding that it
    # is constructor state needs the values, so the view refuses and convert loads with torch.
    osd, msd, _ = trained("adagrad")
    src = folder(tmp_path, osd, msd)
    with pytest.raises(CheckpointError, match="disagree on their scalar state"):
        view_of(src)
    a = import_torch_files(str(src), str(tmp_path / "loader"), world_size=3)
    b = convert(str(src), str(tmp_path / "conv"), world_size=3).manifest
    assert not by_view(b)
    assert [s.checksum for s in a.shards] == [s.checksum for s in b.shards]


def test_named_optimizer_model_pt_and_single_file(tmp_path: Path) -> None:
    model = make_net()
    named = list(model.named_parameters())
    opt = torch.optim.Adam([{"params": named[:4]}, {"params": named[4:], "lr": 0.1}], lr=1e-2)
    train(model, opt, 2, seed=3)
    osd, msd = opt.state_dict(), model.state_dict()
    assert "param_names" in osd["param_groups"][0]
    src = folder(tmp_path, osd, msd, names=False, model_pt=True)
    assert_same_conversion(tmp_path, src, 3, "model-pt")
    single = tmp_path / "ckpt.pt"
    torch.save({"model": msd, "optimizer": osd, "epoch": 7}, single)
    assert view_of(single).manifest.groups[1].hyperparams["lr"] == 0.1
    assert_same_conversion(tmp_path, single, 2, "single")


def test_tied_weights_in_model_pt_are_aliases(tmp_path: Path) -> None:
    model = make_net()
    opt = make_optimizer("adam", model)
    train(model, opt, 2, seed=4)
    msd = dict(model.state_dict())
    msd["tied.weight"] = msd["a.weight"]  # shares a.weight's storage
    src = folder(tmp_path, opt.state_dict(), msd, model_pt=True)
    params = {p.name: p for g in view_of(src).manifest.groups for p in g.params}
    assert params["a.weight"].aliases == ("tied.weight",)
    assert_same_conversion(tmp_path, src, 2, "tied")


def test_what_the_view_refuses_still_converts(tmp_path: Path) -> None:
    osd, msd, _ = trained("adam")
    # a legacy (non-zip) file
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(osd, legacy / "optimizer.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in msd.items()}, str(legacy / "model.safetensors"))
    (legacy / "param_names.json").write_text(json.dumps(NAMES))
    with pytest.raises(CheckpointError, match="legacy"):
        view_of(legacy)
    assert not by_view(convert(str(legacy), str(tmp_path / "legacy-v1")).manifest)
    # a tensor hyperparameter
    model = make_net()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    train(model, opt, 1, seed=5)
    src = folder(tmp_path, opt.state_dict(), model.state_dict(), name="tensor-lr")
    with pytest.raises(CheckpointError, match="tensor"):
        view_of(src)
    assert not by_view(convert(str(src), str(tmp_path / "tensor-lr-v1")).manifest)


def test_differing_steps_and_non_elementwise_state_are_refused(tmp_path: Path) -> None:
    osd, msd, _ = trained("adam")
    steps = {k: dict(v) for k, v in osd["state"].items()}
    steps[0]["step"] = torch.tensor(2.0)
    src = folder(tmp_path, {**osd, "state": steps}, msd, name="steps")
    with pytest.raises(CheckpointError, match="disagree"):
        view_of(src)
    with pytest.raises(TorchStateDictError, match="disagree"):
        convert(str(src), str(tmp_path / "steps-v1"))
    factored = {k: dict(v) for k, v in osd["state"].items()}
    factored[0]["exp_avg"] = torch.zeros(3)
    src = folder(tmp_path, {**osd, "state": factored}, msd, name="factored")
    with pytest.raises(CheckpointError, match="non-elementwise"):
        view_of(src)
    with pytest.raises(TorchStateDictError, match="non-elementwise"):
        convert(str(src), str(tmp_path / "factored-v1"))


def test_corrupted_state_bytes_fail_verify_and_convert(tmp_path: Path) -> None:
    osd, msd, _ = trained("adamw_amsgrad")
    src = folder(tmp_path, osd, msd)
    e = view_of(src).state[(0, "exp_avg")][0]
    raw = bytearray((src / "optimizer.pt").read_bytes())
    raw[e.byte_start] ^= 0xFF
    (src / "optimizer.pt").write_bytes(bytes(raw))
    from zero_ckpt.verification import verify

    assert not verify(str(src)).ok
    with pytest.raises(CorruptShardError, match="CRC-32"):
        convert(str(src), str(tmp_path / "v1"))
    assert not (tmp_path / "v1" / "manifest.json").exists()


def test_align_is_the_optimizers() -> None:
    from zero_core.optimizer import DEFAULT_ALIGN

    assert ALIGN == DEFAULT_ALIGN


PROBE = """
import sys
sys.argv = ["zero-ckpt", *sys.argv[1:]]
from cli.main import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("EXIT", code, "TORCH", "torch" in sys.modules)
"""


def test_jobs_on_a_torch_folder_never_import_torch(tmp_path: Path) -> None:
    osd, msd, _ = trained("adam")
    src = folder(tmp_path, osd, msd)
    jobs = [
        ["convert", str(src), str(tmp_path / "conv"), "--to", "3", "-q"],
        ["reshard", str(src), str(tmp_path / "resh"), "--to", "2", "-q"],
        ["inspect", str(src)],
        ["verify", str(src)],
        ["consolidate", str(src), str(tmp_path / "cons"), "-q"],
    ]
    for args in jobs:
        proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        last = proc.stdout.strip().splitlines()[-1].split()
        assert (int(last[1]), last[3]) == (0, "False"), (args, proc.stdout[-500:], proc.stderr[-500:])
    conv = json.loads((tmp_path / "conv" / "manifest.json").read_text())
    assert conv["extra"]["converted_from"]["created_by"] == "torch.save"
    want = import_torch_files(str(src), str(tmp_path / "loader"), world_size=3)
    assert [s["checksum"] for s in conv["shards"]] == [s.checksum for s in want.shards]


def test_remote_source_is_read_by_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch folder on an object store (memory://) converts through the view: no file of it is
    read whole (the loader reads a remote .pt whole before torch.load)."""
    import time

    import fsspec

    from zero_ckpt.storage import Location

    osd, msd, _ = trained("adamw_amsgrad")
    src = folder(tmp_path, osd, msd)
    url = f"memory://torchview-{time.monotonic_ns()}/src"
    fs = fsspec.filesystem("memory")
    for f in src.iterdir():
        fs.pipe(f"{url}/{f.name}", f.read_bytes())
    whole: list[str] = []
    real = Location.read_bytes

    def spy(self, rel, *a, **k):
        whole.append(rel)
        return real(self, rel, *a, **k)

    monkeypatch.setattr(Location, "read_bytes", spy)
    got = convert(url, str(tmp_path / "v1"), world_size=3).manifest
    assert by_view(got)
    assert set(whole) <= {"param_names.json"}, whole
    want = import_torch_files(str(src), str(tmp_path / "loader"), world_size=3)
    assert [s.checksum for s in got.shards] == [s.checksum for s in want.shards]


def test_a_torch_folder_converts_straight_to_dcp(tmp_path: Path) -> None:
    """Through its view a torch checkpoint goes to any target, here DCP: dcp_to_torch_save of the
    result holds the torch optimizer's own state, tensor for tensor."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    osd, msd, _ = trained("adam")
    src = folder(tmp_path, osd, msd)
    result = convert(str(src), str(tmp_path / "dcp"), to_format="dcp", world_size=2)
    assert result.format == "dcp" and result.files[-1] == ".metadata"
    dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    names = [n for group in NAMES for n in group] if isinstance(NAMES[0], list) else NAMES
    for i, name in enumerate(names):
        if i not in osd["state"]:
            continue
        for key, t in osd["state"][i].items():
            if key == "step":
                assert float(full["optim"]["state"][name]["step"]) == float(t)
            else:
                assert torch.equal(full["optim"]["state"][name][key], t), (name, key)
        assert torch.equal(full["model"][name], msd[name])
