"""The restricted unpickler never runs code from a pickle, and the storage locator finds every
tensor's bytes inside ``torch.save`` zip files."""

from __future__ import annotations

import io
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from zero_ckpt.errors import CorruptShardError
from zero_ckpt.formats.torch_zip import (
    TensorRef,
    Unknown,
    UnsafePickleError,
    open_torch_zip,
    restricted_load,
)
from zero_ckpt.storage import open_location

# ----- malicious pickles ------------------------------------------------------------------------------


def _reduce_pickle(func, args, protocol: int) -> bytes:
    class Evil:
        def __reduce__(self):
            return (func, args)

    return pickle.dumps({"ok": 1, "payload": Evil()}, protocol=protocol)


def _global_pickle(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle calling ``module.name(arg)`` (as an attacker writes it by hand)."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize(
    "func",
    [os.system, eval, exec, open, __import__, getattr],
    ids=["os.system", "eval", "exec", "open", "__import__", "getattr"],
)
def test_code_running_pickles_are_refused(func, protocol: int, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    arg = {
        os.system: f"touch {marker}",
        eval: f"open({str(marker)!r}, 'w').write('x')",
        exec: f"open({str(marker)!r}, 'w').write('x')",
        open: str(marker),
        __import__: "antigravity",
        getattr: "x",
    }[func]
    args = (arg, "w") if func is open else (("abc", "upper") if func is getattr else (arg,))
    data = _reduce_pickle(func, args, protocol)
    with pytest.raises(UnsafePickleError, match="refused"):
        restricted_load(data, "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize(
    "module,name",
    [("subprocess", "Popen"), ("posix", "system"), ("shutil", "rmtree"), ("builtins", "compile"),
     ("importlib", "import_module"), ("runpy", "run_path"), ("pickle", "loads"), ("io", "open")],
)
def test_handwritten_globals_are_refused(module: str, name: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(UnsafePickleError) as exc:
        restricted_load(_global_pickle(module, name, str(marker)), "hand.pkl")
    assert f"{module}.{name}" in str(exc.value) and "hand.pkl" in str(exc.value)
    assert not marker.exists()


class Stateful:
    """A class whose unpickling, if it ran, would leave a file behind."""

    marker: str = ""

    def __init__(self, path: str) -> None:
        self.path = path

    def __setstate__(self, state):  # pragma: no cover - must never run
        Path(state["path"]).write_text("ran")

    def __reduce__(self):
        return (Stateful, (self.path,), {"path": self.path})


def test_unknown_classes_become_inert_records(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = pickle.dumps({"obj": Stateful(str(marker)), "n": [1, 2.5, "s", b"b", None, True]}, protocol=2)
    out = restricted_load(data)
    rec = out["obj"]
    assert isinstance(rec, Unknown)
    assert rec.qualname == f"{__name__}.Stateful" and rec.args == (str(marker),)
    assert rec.state == {"path": str(marker)}
    assert out["n"] == [1, 2.5, "s", b"b", None, True]
    assert not marker.exists()


def test_modules_named_in_a_pickle_are_never_imported() -> None:
    assert "this" not in sys.modules  # importing `this` prints the Zen of Python
    data = _global_pickle("this", "anything", "x")
    rec = restricted_load(data)
    assert isinstance(rec, Unknown) and rec.module == "this" and rec.args == ("x",)
    assert "this" not in sys.modules


def test_dataclass_and_enum_objects_keep_their_data() -> None:
    # What DeepSpeed files hold: dataclass instances (NEWOBJ + BUILD) and IntEnum members.
    data = (
        b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01cdeepspeed.utils.tensor_fragment\nfragment_address\n"
        b"q\x02)\x81q\x03}q\x04(X\x05\x00\x00\x00numelq\x05K\x03X\x05\x00\x00\x00startq\x06K\x07ubX\x01"
        b"\x00\x00\x00bq\x07cdeepspeed.runtime.zero.config\nZeroStageEnum\nq\x08K\x02\x85q\tRq\nu."
    )
    out = restricted_load(data)
    assert out["a"].qualname == "deepspeed.utils.tensor_fragment.fragment_address"
    assert out["a"].state == {"numel": 3, "start": 7}
    assert out["b"].args == (2,)
    assert "deepspeed" not in sys.modules


def test_malformed_pickles_are_clear_errors() -> None:
    with pytest.raises(CorruptShardError, match="bad.pkl: cannot read the pickled data"):
        restricted_load(b"\x80\x02}q\x00(X\x01", "bad.pkl")
    with pytest.raises(CorruptShardError, match="persistent id"):
        restricted_load(pickle.dumps("x", protocol=2).replace(b"X", b"X", 1)[:2] + b"X\x01\x00\x00\x00aQ.", "p.pkl")


def test_malicious_torch_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.ones(3), "evil": Evil()}, tmp_path / "evil.pt")
    with open_location(str(tmp_path)) as loc:
        zf = open_torch_zip(loc, "evil.pt")
        with pytest.raises(UnsafePickleError, match="evil.pt"):
            zf.load()
    assert not marker.exists()


# ----- the storage locator --------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _sample() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=g)
    flat = torch.randn(64, generator=g).to(torch.bfloat16)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(7, generator=g, dtype=torch.float64),
        "f16": torch.randn(4, 3, generator=g).half(),
        "bf16": torch.randn(9, generator=g).to(torch.bfloat16),
        "i64": torch.arange(11),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(6, dtype=torch.int16),
        "i8": torch.arange(-3, 4, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "f8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "view": base[7:19],  # a view: storage offset 7 into a shared storage
        "view2": base[20:50].view(5, 6),
        "views_of_flat": [flat[0:10], flat[10:35].view(5, 5), flat[35:64]],  # how DeepSpeed saves module weights
        "scalar": torch.tensor(3.0),
        "empty": torch.empty(0),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        "nested": OrderedDict(a=(torch.ones(2), {"b": torch.zeros(3, dtype=torch.int64)})),
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
    }


def _walk(a, b):
    if isinstance(a, torch.Tensor):
        yield a, b
    elif isinstance(a, dict):
        for k in a:
            yield from _walk(a[k], b[k])
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        for x, y in zip(a, b):
            yield from _walk(x, y)


@pytest.mark.parametrize("backend", ["file", "memory"])
def test_located_bytes_are_the_tensor_bytes(backend: str, tmp_path: Path) -> None:
    obj = _sample()
    buf = io.BytesIO()
    torch.save(obj, buf)
    if backend == "file":
        (tmp_path / "x.pt").write_bytes(buf.getvalue())
        url = str(tmp_path)
    else:
        import fsspec

        url = f"memory://locator-{os.getpid()}"
        fsspec.filesystem("memory").pipe(f"{url}/x.pt", buf.getvalue())
    with open_location(url) as loc:
        zf = open_torch_zip(loc, "x.pt")
        out = zf.load()
        assert out["size"] == (2, 3) and out["dtype"] == "float16"
        pairs = list(_walk(obj, out))
        assert len(pairs) == 22
        for t, ref in pairs:
            assert isinstance(ref, TensorRef)
            assert ref.shape == tuple(t.shape) and ref.dtype == str(t.dtype).removeprefix("torch.")
            start, nbytes = zf.tensor_range(ref)
            assert loc.read_range("x.pt", start, start + nbytes) == _tensor_bytes(t)
        assert zf.read_scalar(out["scalar"]) == 3.0
        views = out["views_of_flat"]
        assert len({v.storage.key for v in views}) == 1 and [v.offset for v in views] == [0, 10, 35]


def test_non_contiguous_tensor_is_refused_as_a_range(tmp_path: Path) -> None:
    torch.save({"t": torch.arange(12.0).view(3, 4).t()}, tmp_path / "x.pt")
    with open_location(str(tmp_path)) as loc:
        zf = open_torch_zip(loc, "x.pt")
        with pytest.raises(CorruptShardError, match="non-contiguously"):
            zf.tensor_range(zf.load()["t"])


def test_legacy_and_repacked_files_are_refused_by_name(tmp_path: Path) -> None:
    torch.save({"t": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"t": torch.ones(200)}, tmp_path / "new.pt")
    with zipfile.ZipFile(tmp_path / "new.pt") as src, zipfile.ZipFile(
        tmp_path / "deflated.pt", "w", compression=zipfile.ZIP_DEFLATED
    ) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "new.pt").read_bytes()[:-100])
    with open_location(str(tmp_path)) as loc:
        with pytest.raises(CorruptShardError, match="legacy"):
            open_torch_zip(loc, "legacy.pt")
        with pytest.raises(CorruptShardError, match="compressed"):
            open_torch_zip(loc, "deflated.pt")
        with pytest.raises(CorruptShardError, match="trunc.pt"):
            open_torch_zip(loc, "trunc.pt")
