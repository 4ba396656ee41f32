"""The layer rules of DESIGN.md, held by tests.

- ``zero_core`` never imports ``zero_ckpt`` (nor ``cli``), fsspec or s3fs.
- The pure modules (layout, manifest, plan, checks, safetensors_format, checksum, errors) import
  neither fsspec nor torch (torch.distributed included), directly or through other project
  modules.
- ``cli`` imports only the public modules of ``zero_ckpt``/``zero_core``, click, tqdm and the
  standard library: it never talks to fsspec (or torch) itself.

Static checks read every ``.py`` file with ``ast`` (imports inside functions count too); dynamic
checks import in a fresh interpreter and look at ``sys.modules``. Modules that do not exist yet
are skipped; the core files must exist.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE_FILES = [
    "zero_core/__init__.py",
    "zero_core/layout.py",
    "zero_ckpt/manifest.py",
    "zero_ckpt/safetensors_format.py",
    "zero_ckpt/checksum.py",
    "zero_ckpt/errors.py",
]
# Pure planning/metadata modules: no I/O library, no torch at all.
PURE_MODULES = [
    "zero_core.layout",
    "zero_ckpt.manifest",
    "zero_ckpt.plan",
    "zero_ckpt.checks",
    "zero_ckpt.safetensors_format",
    "zero_ckpt.checksum",
    "zero_ckpt.errors",
]
STORAGE_LIBS = ("fsspec", "s3fs")


# ----- static import scan -----------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def py_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _eager_nodes(tree: ast.AST):
    """Nodes that run when the module is imported: not inside functions or lambdas, nor under
    ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, eager_only: bool = False) -> list[tuple[int, str, str | None]]:
    """``(line, module, imported name or None)`` for every import in the file.

    ``from a.b import c`` yields ``("a.b", "c")``: ``c`` may be a name or a submodule.
    Relative imports are resolved against the file's package; ``importlib.import_module("x")``
    and ``__import__("x")`` with a literal name count as imports of ``x``. By default lazy
    imports (inside functions) count too; ``eager_only`` keeps those that run at import time.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out: list[tuple[int, str, str | None]] = []
    for node in _eager_nodes(tree) if eager_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.extend((node.lineno, mod, alias.name) for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if fname in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append((node.lineno, arg.value, None))
    return out


def imported_modules(path: Path, eager_only: bool = False) -> list[tuple[int, str]]:
    """Every module name an import in ``path`` may load (``from a import b`` -> a, a.b)."""
    out = []
    for line, mod, name in imports_of(path, eager_only):
        out.append((line, mod))
        if name and name != "*":
            out.append((line, f"{mod}.{name}"))
    return out


def is_under(module: str, top: str) -> bool:
    return module == top or module.startswith(top + ".")


def violations(path: Path, forbidden: tuple[str, ...], eager_only: bool = False) -> list[str]:
    rel = path.relative_to(ROOT)
    return sorted(
        {
            f"{rel}:{line} imports {mod}"
            for line, mod in imported_modules(path, eager_only)
            for top in forbidden
            if is_under(mod, top)
        }
    )


def project_closure(module: str) -> dict[str, tuple[Path, list[str]]]:
    """Project modules that importing ``module`` loads: it, its parent packages, and what they
    import from the project at import time, transitively (lazy imports in functions and
    ``if TYPE_CHECKING:`` imports do not run, so they are not followed).

    Maps each module name to ``(path, chain)``: the modules through which it gets loaded.
    """
    seen: dict[str, tuple[Path, list[str]]] = {}
    todo: list[tuple[str, list[str]]] = [(module, [])]
    while todo:
        name, chain = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module loads its parent packages first
            prefix = ".".join(parts[:i])
            path = module_path(prefix)
            if path is None or prefix in seen:
                continue
            seen[prefix] = (path, chain + [prefix])
            for _, mod in imported_modules(path, eager_only=True):
                if mod.split(".")[0] in ("zero_core", "zero_ckpt", "cli"):
                    todo.append((mod, chain + [prefix]))
    return seen


def existing(modules: list[str]) -> list[str]:
    return [m for m in modules if module_path(m) is not None]


def test_core_files_exist():
    missing = [f for f in CORE_FILES if not (ROOT / f).is_file()]
    assert missing == []


def test_every_python_file_parses():
    for package in ("zero_core", "zero_ckpt", "cli"):
        for path in py_files(package):
            imports_of(path)  # raises SyntaxError naming the file


def test_scanner_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The scanner itself: absolute, from, relative, aliased, lazy and dynamic imports."""
    pkg = tmp_path / "zero_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        "import os, fsspec.core as fc\n"
        "from torch import distributed as dist\n"
        "from . import sibling\n"
        "from ..zero_ckpt import manifest\n"
        "def f():\n"
        "    import s3fs\n"
        "    importlib.import_module('zero_ckpt.storage')\n"
        "    __import__('torch')\n"
        "if TYPE_CHECKING:\n"
        "    import boto3\n"
        "else:\n"
        "    import json\n"
        "class C:\n"
        "    import tqdm\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mods = {m for _, m in imported_modules(pkg / "mod.py")}
    assert {
        "os",
        "fsspec.core",
        "torch",
        "torch.distributed",
        "zero_core",
        "zero_core.sibling",
        "zero_ckpt",
        "zero_ckpt.manifest",
        "s3fs",
        "zero_ckpt.storage",
        "boto3",
        "json",
        "tqdm",
    } <= mods
    eager = {m for _, m in imported_modules(pkg / "mod.py", eager_only=True)}
    assert eager == {
        "os",
        "fsspec.core",
        "torch",
        "torch.distributed",
        "zero_core",
        "zero_core.sibling",
        "zero_ckpt",
        "zero_ckpt.manifest",
        "json",
        "tqdm",
    }
    assert violations(pkg / "mod.py", ("fsspec", "s3fs", "zero_ckpt")) == [
        "zero_core/mod.py:1 imports fsspec.core",
        "zero_core/mod.py:4 imports zero_ckpt",
        "zero_core/mod.py:4 imports zero_ckpt.manifest",
        "zero_core/mod.py:6 imports s3fs",
        "zero_core/mod.py:7 imports zero_ckpt.storage",
    ]


INTEGRATIONS = "zero_core/integrations/"


def test_zero_core_imports_no_zero_ckpt_or_storage():
    """The optimizer never imports the checkpoint toolkit. The trainer integrations
    (``zero_core/integrations/``) sit above the bridge: they save and resume through
    ``zero_ckpt.save/load``, imported inside the functions that do it, never at import time."""
    files = py_files("zero_core")
    assert ROOT / "zero_core/layout.py" in files
    bad = []
    for path in files:
        if path.relative_to(ROOT).as_posix().startswith(INTEGRATIONS):
            bad += violations(path, ("cli", *STORAGE_LIBS))
            bad += violations(path, ("zero_ckpt",), eager_only=True)
        else:
            bad += violations(path, ("zero_ckpt", "cli", *STORAGE_LIBS))
    assert bad == []


@pytest.mark.parametrize("module", existing(PURE_MODULES))
def test_pure_module_imports_no_torch_or_storage(module):
    path = module_path(module)
    assert violations(path, ("torch", *STORAGE_LIBS)) == []


def _closure_params():
    return [
        m for m in existing(PURE_MODULES)
    ]


@pytest.mark.parametrize("module", _closure_params())
def test_pure_module_closure_imports_no_torch_or_storage(module):
    """Through other project modules too: a pure module that imports an impure one is impure."""
    bad = [
        f"{v} (import {module} loads {' -> '.join(chain)})"
        for path, chain in project_closure(module).values()
        for v in violations(path, ("torch", *STORAGE_LIBS), eager_only=True)
    ]
    assert bad == []


def _public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split("."))


def test_cli_imports_only_public_library_modules_click_tqdm():
    allowed_third_party = ("click", "tqdm")
    bad = []
    for path in py_files("cli"):
        rel = path.relative_to(ROOT)
        for line, mod, name in imports_of(path):
            top = mod.split(".")[0]
            where = f"{rel}:{line} imports {mod}" + (f".{name}" if name else "")
            if top in ("zero_ckpt", "zero_core"):
                if not _public(mod) or (name is not None and name.startswith("_")):
                    bad.append(f"{where} (private)")
            elif top == "cli" or top in allowed_third_party or top in sys.stdlib_module_names:
                continue
            else:
                bad.append(f"{where} (the CLI goes through zero_ckpt/zero_core)")
    assert bad == []


# ----- dynamic: what importing really loads -----------------------------------------------------


def loaded_after(code_imports: list[str], watch: list[str]) -> list[dict[str, list[str]]]:
    """In a fresh interpreter, import each module in turn; after each, which watched top-level
    modules are in sys.modules."""
    script = (
        "import importlib, json, sys\n"
        f"watch = {watch!r}\n"
        "out = []\n"
        f"for name in {code_imports!r}:\n"
        "    importlib.import_module(name)\n"
        "    out.append({name: sorted(w for w in watch if w in sys.modules)})\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


WATCH = ["torch", "torch.distributed", "fsspec", "s3fs", "zero_ckpt"]


def test_import_zero_core_loads_no_storage_nor_distributed():
    (after,) = loaded_after(["zero_core"], WATCH)
    assert "fsspec" not in after["zero_core"]
    assert "s3fs" not in after["zero_core"]
    assert "torch.distributed" not in after["zero_core"]
    assert "zero_ckpt" not in after["zero_core"]


def test_import_layout_and_manifest_loads_no_torch():
    result = loaded_after(["zero_core.layout", "zero_ckpt.manifest"], WATCH)
    assert result == [
        {"zero_core.layout": []},
        {"zero_ckpt.manifest": ["zero_ckpt"]},
    ]


def test_import_every_pure_module_loads_no_torch():
    modules = existing(PURE_MODULES)
    result = loaded_after(modules, ["torch", "fsspec", "s3fs"])
    assert result == [{m: []} for m in modules]


def test_package_functions_survive_submodule_imports():
    # Importing a submodule sets it as an attribute of the package: a module named like a
    # public function would shadow the function.
    import importlib
    import pkgutil

    import zero_ckpt

    for info in pkgutil.walk_packages(zero_ckpt.__path__, "zero_ckpt."):
        importlib.import_module(info.name)
    for name in zero_ckpt.__all__:
        value = getattr(zero_ckpt, name)
        assert not isinstance(value, type(zero_ckpt)), f"zero_ckpt.{name} is shadowed by a module"
