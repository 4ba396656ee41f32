"""Plain torch optimizer state dicts into format v1 and back (``zero_ckpt.formats.torch_optim``).

The model has two param groups (odd sizes, so align 4 cuts params across ranks), a BatchNorm
(buffers, including an int64 one) and a frozen param in the middle of the second group. For
Adam, AdamW(amsgrad), SGD(momentum), Adagrad and RMSprop(centered, momentum): train a few steps
with the plain optimizer, import at world sizes 1, 3 and 8, export with ``format="torch"``: the
plain optimizer loads the export, every state tensor and step equals the original bit for bit,
and training continued from the export equals training continued from the original.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import zero_ckpt
from cli.main import cli
from zero_ckpt.conversion import consolidate_source, convert
from zero_ckpt.errors import CheckpointError, DestinationExistsError
from zero_ckpt.formats.torch_optim import (
    EXTRA_KEY,
    TorchStateDictError,
    export_torch,
    import_torch,
)

ROOT = Path(__file__).resolve().parents[1]
DS_FIXTURES = ROOT / "fixtures" / "deepspeed"


class Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 7) * 0.3)
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias + self.frozen


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(5, 7)
        self.norm = torch.nn.BatchNorm1d(7)
        self.head = Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.a(x))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


NAMES = ["a.weight", "a.bias", "norm.weight", "norm.bias", "head.weight", "head.frozen", "head.bias"]

# class, defaults, group-1 overrides
OPTIMIZERS = {
    "adam": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.01}, {"lr": 3e-2}),
    "adamw_amsgrad": (
        torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True}, {"lr": 2e-2, "weight_decay": 0.1}
    ),
    "sgd_momentum": (torch.optim.SGD, {"lr": 5e-2, "momentum": 0.9, "nesterov": True}, {"lr": 1e-2}),
    "adagrad": (
        torch.optim.Adagrad, {"lr": 1e-1, "lr_decay": 0.01}, {"lr": 5e-2, "initial_accumulator_value": 0.1}
    ),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.5, "centered": True}, {"lr": 2e-2}),
}


def param_groups(model: Net, overrides: dict) -> list[dict]:
    params = [p for _, p in model.named_parameters()]
    return [{"params": params[:4]}, {"params": params[4:], **overrides}]


def make_optimizer(kind: str, model: Net) -> torch.optim.Optimizer:
    cls, defaults, overrides = OPTIMIZERS[kind]
    return cls(param_groups(model, overrides), **defaults)


def train(model: Net, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 5, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


_TRAINED: dict[str, tuple] = {}


def trained(kind: str) -> tuple[dict, dict, dict]:
    """(optimizer state dict, model state dict) after 3 steps, and the model state after 2
    more steps continued from there (the reference)."""
    if kind not in _TRAINED:
        model = make_net()
        opt = make_optimizer(kind, model)
        train(model, opt, 3, seed=1)
        osd, msd = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
        train(model, opt, 2, seed=2)
        _TRAINED[kind] = (osd, msd, copy.deepcopy(model.state_dict()))
    return _TRAINED[kind]


def assert_same_state_dict(got: dict, want: dict) -> None:
    """Bit-for-bit equal optimizer state dicts; got's groups may add ``param_names``."""
    assert sorted(got["state"]) == sorted(want["state"])
    for pid, st in want["state"].items():
        assert list(got["state"][pid]) == list(st), pid
        for key, value in st.items():
            mine = got["state"][pid][key]
            assert type(mine) is type(value), (pid, key)
            if isinstance(value, torch.Tensor):
                assert mine.dtype == value.dtype and mine.shape == value.shape, (pid, key)
                assert torch.equal(mine, value), (pid, key)
            else:
                assert mine == value, (pid, key)
    assert len(got["param_groups"]) == len(want["param_groups"])
    for g, w in zip(got["param_groups"], want["param_groups"]):
        if "param_names" in w:
            assert g["param_names"] == w["param_names"]
        assert {k: v for k, v in g.items() if k != "param_names"} == {
            k: v for k, v in w.items() if k != "param_names"
        }
        assert all(type(g[k]) is type(v) for k, v in w.items())


def continue_from(out: Path, kind: str, model_file: str = "model.safetensors") -> dict:
    model = make_net()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # nothing of the fresh model may survive the load
    state = load_file(str(out / model_file)) if model_file.endswith(".safetensors") else torch.load(
        out / model_file, weights_only=True
    )
    model.load_state_dict(state, strict=True)
    opt = make_optimizer(kind, model)
    opt.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
    train(model, opt, 2, seed=2)
    return model.state_dict()


def assert_same_model(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("world_size", [1, 3, 8])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_round_trip_is_exact(tmp_path: Path, kind: str, world_size: int) -> None:
    osd, msd, reference = trained(kind)
    # every way of naming the params: a flat list, the module, one list per group
    names = {1: NAMES, 3: make_net(), 8: [NAMES[:4], NAMES[4:]]}[world_size]
    manifest = import_torch(
        osd, msd, str(tmp_path / "v1"), world_size=world_size, param_names=names, align=4
    )
    assert manifest.world_size == world_size and len(manifest.shards) == world_size
    owned = [p.name for g in manifest.groups for p in g.params]
    assert "head.frozen" not in owned  # frozen: in model.safetensors, not in a flat buffer
    assert manifest.extra[EXTRA_KEY]["groups"][1]["params"] == NAMES[4:]
    assert zero_ckpt.verify(str(tmp_path / "v1")).ok
    reader = zero_ckpt.open_checkpoint(str(tmp_path / "v1"))
    assert torch.equal(reader.read("a.weight"), msd["a.weight"])

    result = export_torch(str(tmp_path / "v1"), str(tmp_path / "out"))
    assert sorted(result.files) == ["model.safetensors", "optimizer.pt"]
    exported = torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True)
    assert_same_state_dict(exported, osd)
    assert [g["param_names"] for g in exported["param_groups"]] == [NAMES[:4], NAMES[4:]]
    if "step" in osd["state"][0]:
        step = exported["state"][0]["step"]
        assert step.dtype == torch.float32 and step.dim() == 0
    assert_same_model(load_file(str(tmp_path / "out" / "model.safetensors")), msd)
    assert_same_model(continue_from(tmp_path / "out", kind), reference)


def test_model_pt_and_reshard_keep_the_record(tmp_path: Path) -> None:
    osd, msd, reference = trained("adamw_amsgrad")
    import_torch(osd, msd, str(tmp_path / "v1"), world_size=3, param_names=NAMES, align=4)
    zero_ckpt.reshard(str(tmp_path / "v1"), str(tmp_path / "v5"), world_size=5)
    files = consolidate_source(
        str(tmp_path / "v5"), str(tmp_path / "out"), format="torch", model_format="pt"
    )
    assert files == ["model.pt", "optimizer.pt"]
    assert_same_state_dict(torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True), osd)
    assert_same_model(torch.load(tmp_path / "out" / "model.pt", weights_only=True), msd)
    assert_same_model(continue_from(tmp_path / "out", "adamw_amsgrad", "model.pt"), reference)


def test_names_recorded_by_a_named_optimizer(tmp_path: Path) -> None:
    model = make_net()
    named = list(model.named_parameters())
    opt = torch.optim.Adam([{"params": named[:4]}, {"params": named[4:], "lr": 0.1}], lr=1e-2)
    train(model, opt, 2, seed=3)
    osd = opt.state_dict()
    assert osd["param_groups"][0]["param_names"] == NAMES[:4]
    import_torch(osd, model.state_dict(), str(tmp_path / "v1"), world_size=2, align=4)
    export_torch(str(tmp_path / "v1"), str(tmp_path / "out"))
    got = torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True)
    assert_same_state_dict(got, osd)  # param_names equal too: the original has them
    with pytest.raises(TorchStateDictError, match="differ from the names the state dict records"):
        import_torch(
            osd, model.state_dict(), str(tmp_path / "v2"), world_size=2, param_names=NAMES[::-1]
        )


def test_unstepped_params_are_kept_out_of_the_flat_buffer(tmp_path: Path) -> None:
    """A trainable param that never got a gradient has no state in a group whose other params
    have: it is stored like a frozen param (not zero-filled: Adam with step N and zero moments
    would update it differently than the fresh state torch has)."""
    model = make_net()
    opt = make_optimizer("adam", model)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):  # a.bias gets no gradient: an unused param
        x = torch.randn(6, 5, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        model.a.bias.grad = None
        opt.step()
    osd = copy.deepcopy(opt.state_dict())
    assert 1 not in osd["state"]
    manifest = import_torch(osd, model.state_dict(), str(tmp_path / "v1"), world_size=3, param_names=NAMES)
    assert [p.name for p in manifest.groups[0].params] == ["a.weight", "norm.weight", "norm.bias"]
    assert "a.bias" in load_file(str(tmp_path / "v1" / "model.safetensors"))
    export_torch(str(tmp_path / "v1"), str(tmp_path / "out"))
    assert_same_state_dict(torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True), osd)


def test_mixed_dtypes_tied_weights_and_tensor_lr(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(6, 4)
            self.out = torch.nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight  # tied: state_dict has both names
            self.scale = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(idx) * self.scale.float())

    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.Adam(
        model.parameters(), lr=torch.tensor(0.01), foreach=False, betas=(0.8, 0.9)
    )
    for i in range(2):
        opt.zero_grad()
        model(torch.tensor([[1, 2, 3], [4, 5, i]])).logsumexp(-1).sum().backward()
        opt.step()
    osd = copy.deepcopy(opt.state_dict())
    assert osd["state"][0]["exp_avg"].dtype == torch.bfloat16  # id 0: the root's own "scale"
    manifest = import_torch(osd, model, str(tmp_path / "v1"), world_size=2, align=2)
    (group,) = manifest.groups
    assert [p.name for p in group.params] == ["scale", "emb.weight"]
    assert group.params[1].aliases == ("out.weight",)
    assert group.params[0].dtype == "bfloat16" and manifest.master_dtype == "float32"
    assert group.state_dtypes == {}  # the flat is fp32; scale's bf16 is recorded and restored
    export_torch(str(tmp_path / "v1"), str(tmp_path / "out"))
    got = torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True)
    assert_same_state_dict(got, osd)
    assert isinstance(got["param_groups"][0]["lr"], torch.Tensor)
    assert got["param_groups"][0]["betas"] == (0.8, 0.9)
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(weights["out.weight"], model.emb.weight) and weights["scale"].dtype == torch.bfloat16


def test_export_of_a_checkpoint_without_the_torch_record(tmp_path: Path) -> None:
    """ZeroOptimizer checkpoints carry no torch record: torch's own conventions apply."""
    gen = torch.Generator().manual_seed(0)
    group = {
        n: {"master": torch.randn(s, generator=gen), "exp_avg": torch.randn(s, generator=gen),
            "exp_avg_sq": torch.rand(s, generator=gen)}
        for n, s in [("w", (3, 2)), ("b", (3,))]
    }
    hyper = {"lr": 0.1, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
    zero_ckpt.write_checkpoint(
        str(tmp_path / "v1"), [group], world_size=2, hyperparams=[hyper], scalars=[{"step": 5}]
    )
    export_torch(str(tmp_path / "v1"), str(tmp_path / "out"))
    got = torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True)
    assert got["param_groups"][0]["betas"] == (0.9, 0.99)
    assert got["param_groups"][0]["params"] == [0, 1]
    assert got["state"][0]["step"].dtype == torch.float32 and got["state"][0]["step"].item() == 5
    assert torch.equal(got["state"][1]["exp_avg"], group["b"]["exp_avg"])
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(3))]
    torch.optim.Adam(params).load_state_dict(got)


# ----- refusals ------------------------------------------------------------------------------------


def test_missing_names_are_refused_with_the_fix(tmp_path: Path) -> None:
    osd, msd, _ = trained("adam")
    with pytest.raises(TorchStateDictError, match="names no parameters.*pass param_names="):
        import_torch(osd, msd, str(tmp_path / "v1"), world_size=2)
    with pytest.raises(TorchStateDictError, match="param_names has 3 names"):
        import_torch(osd, msd, str(tmp_path / "v1"), world_size=2, param_names=NAMES[:3])
    with pytest.raises(TorchStateDictError, match="'nope' .* is not in the model state dict"):
        import_torch(osd, msd, str(tmp_path / "v1"), world_size=2, param_names=NAMES[:-1] + ["nope"])
    with pytest.raises(TorchStateDictError, match="not a torch optimizer state dict"):
        import_torch({"groups": []}, msd, str(tmp_path / "v1"), world_size=2, param_names=NAMES)
    assert not (tmp_path / "v1").exists()  # refused before the destination was touched


def test_wrong_name_order_and_non_elementwise_state_are_refused(tmp_path: Path) -> None:
    osd, msd, _ = trained("adam")
    swapped = NAMES[:2][::-1] + NAMES[2:]
    with pytest.raises(TorchStateDictError, match="not in the optimizer's id order.*non-elementwise"):
        import_torch(osd, msd, str(tmp_path / "v1"), world_size=2, param_names=swapped)
    factored = copy.deepcopy(osd)
    factored["state"][0]["exp_avg_sq"] = torch.ones(7)  # a row factor, as Adafactor keeps
    with pytest.raises(TorchStateDictError, match=r"'exp_avg_sq' of param 'a.weight'.*shape \[7\]"):
        import_torch(factored, msd, str(tmp_path / "v1"), world_size=2, param_names=NAMES)
    assert not (tmp_path / "v1").exists()


def test_inconsistent_steps_and_bad_hyperparams_are_refused(tmp_path: Path) -> None:
    osd, msd, _ = trained("adam")
    bad = copy.deepcopy(osd)
    bad["state"][2]["step"] = torch.tensor(2.0)
    with pytest.raises(TorchStateDictError, match=r"disagree on their scalar state: .*'step': [23]"):
        import_torch(bad, msd, str(tmp_path / "v1"), world_size=2, param_names=NAMES)
    bad = copy.deepcopy(osd)
    bad["param_groups"][1]["schedule"] = lambda step: step
    with pytest.raises(TorchStateDictError, match="hyperparameter 'schedule' is a function"):
        import_torch(bad, msd, str(tmp_path / "v1"), world_size=2, param_names=NAMES)
    bad["param_groups"][1]["schedule"] = float("nan")
    with pytest.raises(TorchStateDictError, match="not finite"):
        import_torch(bad, msd, str(tmp_path / "v1"), world_size=2, param_names=NAMES)


def test_unknown_formats_are_refused(tmp_path: Path) -> None:
    osd, msd, _ = trained("sgd_momentum")
    import_torch(osd, msd, str(tmp_path / "v1"), world_size=2, param_names=NAMES)
    with pytest.raises(CheckpointError, match="unknown source format 'tf'"):
        convert(str(tmp_path / "v1"), str(tmp_path / "x"), from_format="tf")
    with pytest.raises(CheckpointError, match="unknown output format 'onnx'"):
        consolidate_source(str(tmp_path / "v1"), str(tmp_path / "x"), format="onnx")
    with pytest.raises(CheckpointError, match="model_format"):
        export_torch(str(tmp_path / "v1"), str(tmp_path / "x"), model_format="h5")
    with pytest.raises(DestinationExistsError):
        export_torch(str(tmp_path / "v1"), str(tmp_path / "v1"))


# ----- files, CLI ----------------------------------------------------------------------------------


def test_folder_and_single_file_conventions(tmp_path: Path) -> None:
    osd, msd, reference = trained("rmsprop")
    src = tmp_path / "torch"
    src.mkdir()
    torch.save(osd, src / "optimizer.pt")
    save_file({k: v.contiguous() for k, v in msd.items()}, str(src / "model.safetensors"))
    with pytest.raises(TorchStateDictError, match="param_names.json"):
        convert(str(src), str(tmp_path / "v1"), world_size=3)
    (src / "param_names.json").write_text(json.dumps([NAMES[:4], NAMES[4:]]))
    manifest = convert(str(src), str(tmp_path / "v1"), world_size=3).manifest  # auto-detected
    assert manifest.world_size == 3 and manifest.extra["converted_from"]["format"] == "torch"
    export_torch(str(tmp_path / "v1"), str(tmp_path / "out"))
    assert_same_model(continue_from(tmp_path / "out", "rmsprop"), reference)
    # an export is itself a torch folder (names recorded in optimizer.pt): it converts again
    convert(str(tmp_path / "out"), str(tmp_path / "v1b"), world_size=2)

    combined = tmp_path / "ckpt.pt"
    torch.save({"model": msd, "optimizer": osd, "epoch": 3}, combined)
    convert(str(combined), str(tmp_path / "v2"), from_format="torch", world_size=2, param_names=NAMES)
    export_torch(str(tmp_path / "v2"), str(tmp_path / "out2"))
    assert_same_state_dict(torch.load(tmp_path / "out2" / "optimizer.pt", weights_only=True), osd)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch " + str(_Evil.marker),))


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    osd, msd, _ = trained("adam")
    src = tmp_path / "torch"
    src.mkdir()
    _Evil.marker = tmp_path / "pwned"
    with open(src / "optimizer.pt", "wb") as f:
        torch.save({"state": {}, "param_groups": [{"params": [], "x": _Evil()}]}, f)
    save_file({k: v.contiguous() for k, v in msd.items()}, str(src / "model.safetensors"))
    with pytest.raises(TorchStateDictError, match="nothing from the file was executed"):
        convert(str(src), str(tmp_path / "v1"))
    assert not _Evil.marker.exists() and not (tmp_path / "v1").exists()


def test_cli_convert_and_consolidate(tmp_path: Path) -> None:
    osd, msd, reference = trained("adagrad")
    src = tmp_path / "torch"
    src.mkdir()
    torch.save(osd, src / "optimizer.pt")
    torch.save(msd, src / "model.pt")
    (tmp_path / "names.json").write_text(json.dumps(NAMES))
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(src), str(tmp_path / "v1"), "--to", "3"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "param_names" in res.output
    res = runner.invoke(
        cli,
        ["convert", str(src), str(tmp_path / "v1"), "--from-format", "torch", "--to", "3",
         "--param-names", str(tmp_path / "names.json"), "--json"],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["from_format"] == "torch" and doc["world_size"] == 3
    v1 = str(tmp_path / "v1")
    res = runner.invoke(cli, ["consolidate", v1, str(tmp_path / "out"), "--format", "torch", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["files"] == ["model.safetensors", "optimizer.pt"]
    assert_same_state_dict(torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True), osd)
    assert_same_model(continue_from(tmp_path / "out", "adagrad"), reference)
    res = runner.invoke(cli, ["consolidate", v1, str(tmp_path / "o2"), "--format", "torch", "--part", "0/2"])
    assert res.exit_code == 2 and "--part" in res.output
    res = runner.invoke(cli, ["consolidate", v1, str(tmp_path / "o3"), "--model-format", "pt"])
    assert res.exit_code == 2
    res = runner.invoke(cli, ["convert", str(src), str(tmp_path / "v9"), "--from-format", "tf"])
    assert res.exit_code == 2


@pytest.mark.skipif(not (DS_FIXTURES / "z2_fp32_dp2").is_dir(), reason="no DeepSpeed fixtures")
def test_deepspeed_checkpoint_to_torch(tmp_path: Path) -> None:
    src = str(DS_FIXTURES / "z2_fp32_dp2" / "ckpt")
    export_torch(src, str(tmp_path / "out"))
    consolidate_source(src, str(tmp_path / "full"), include_optimizer=True)
    got = torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True)
    full = load_file(str(tmp_path / "full" / "optimizer.safetensors"))
    checked = 0
    for group in got["param_groups"]:
        for pid, name in zip(group["params"], group["param_names"]):
            for key, value in got["state"].get(pid, {}).items():
                if key != "step":
                    assert torch.equal(value, full[f"{name}.{key}"]), (name, key)
                    checked += 1
    assert checked > 0


# ----- sharded optimizers' consolidated state dicts -------------------------------------------


def _sharded_scenario(rank: int, world_size: int, out: str) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from zero_core import ZeroOptimizer

    model = make_net()
    zro = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2, amsgrad=True)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):  # same data on every rank: no gradient averaging needed
        zro.zero_grad()
        model(torch.randn(6, 5, generator=gen)).pow(2).mean().backward()
        zro.step()
    zro.consolidate_state_dict(to=0)
    zmodel = make_net()
    named = list(zmodel.named_parameters())
    zgroups = [{"params": named[:4]}, {"params": named[4:], "lr": 0.1}]
    zopt = ZeroOptimizer(zgroups, torch.optim.Adagrad, lr=0.05)
    for _ in range(2):
        zopt.zero_grad()
        zmodel(torch.randn(6, 5, generator=gen)).pow(2).mean().backward()
        zopt.step()
    consolidated = zopt.consolidate_state_dict(to=0)
    if rank == 0:
        zro_ckpt = {"optimizer": zro.state_dict(), "model": model.state_dict()}
        torch.save(zro_ckpt, f"{out}/zero_redundancy.pt")
        torch.save({"optimizer": consolidated, "model": zmodel.state_dict()}, f"{out}/zero_optimizer.pt")


def _zero_load_scenario(rank: int, world_size: int, out: str) -> None:
    """A plain AdamW state imported at world size 3 loads into a ZeroOptimizer at 2: states
    and weights exactly, and training goes on as the plain optimizer's does."""
    import torch.distributed as dist

    from zero_core import ZeroOptimizer

    osd, msd, reference = trained("adamw_amsgrad")
    path = f"{out}/for-zero"
    if rank == 0:
        import_torch(osd, msd, path, world_size=3, param_names=NAMES, align=4)
    dist.barrier()
    model = make_net()
    named = list(model.named_parameters())
    cls, defaults, overrides = OPTIMIZERS["adamw_amsgrad"]
    groups = [{"params": named[:4]}, {"params": named[4:], **overrides}]
    opt = ZeroOptimizer(groups, cls, **defaults)
    zero_ckpt.load(path, optimizer=opt, model=model)
    for pid, name in enumerate(NAMES):
        assert torch.equal(model.state_dict()[name], msd[name]), name
        for key, value in osd["state"].get(pid, {}).items():
            assert torch.equal(torch.as_tensor(opt.get_full_state(name, key)), value), (name, key)
    train(model, opt, 2, seed=2)
    for name, value in reference.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_consolidated_state_dicts_of_sharded_optimizers(tmp_path: Path) -> None:
    from _dist import check, run_scenarios

    results = run_scenarios(
        [
            ("sharded", _sharded_scenario, (str(tmp_path),)),
            ("zero-load", _zero_load_scenario, (str(tmp_path),)),
        ],
        world_size=2,
    )
    check(results, "sharded", 2)
    check(results, "zero-load", 2)
    for name, names in [("zero_redundancy", NAMES), ("zero_optimizer", None)]:
        ckpt = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        osd = ckpt["optimizer"]
        v1 = str(tmp_path / f"{name}-v1")
        import_torch(osd, ckpt["model"], v1, world_size=3, param_names=names, align=4)
        export_torch(v1, str(tmp_path / f"{name}-out"))
        got = torch.load(tmp_path / f"{name}-out" / "optimizer.pt", weights_only=True)
        want = {"state": dict(sorted(osd["state"].items())), "param_groups": osd["param_groups"]}
        assert_same_state_dict(got, want)
        if name == "zero_optimizer":  # Adagrad's frozen param keeps its constructor state
            assert torch.equal(got["state"][5]["sum"], torch.zeros(3))
            assert got["state"][5]["step"].item() == 0
        model = make_net()
        plain = (
            torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
            if name == "zero_redundancy"
            else make_adagrad(model)
        )
        plain.load_state_dict(got)


def make_adagrad(model: Net) -> torch.optim.Optimizer:
    named = [p for _, p in model.named_parameters()]
    return torch.optim.Adagrad([{"params": named[:4]}, {"params": named[4:], "lr": 0.1}], lr=0.05)
