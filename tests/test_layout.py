"""The package's layers: the backend at the top of `mst_fx/`, one folder per layer below it, and no
module importing one of a folder above its own (a lazy import inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package name -> its folder; `passes/` ships as `mst_fx.passes`
FOLDERS = {"mst_fx": ROOT / "mst_fx", "mst_fx.passes": ROOT / "passes"}
MAX_TOP_MODULES = 5


def modules() -> dict[str, Path]:
    """Every module's dotted name -> its file, `__init__.py` named as its package."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


MODULES = modules()


def folder_of(name: str) -> str:
    """The package whose folder holds module `name` (a package's own `__init__` is in its folder)."""
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def imported(name: str, path: Path) -> set[str]:
    """The mst_fx modules `name` imports, relative imports resolved; `from pkg import x` imports
    module `pkg.x` when there is one, else `pkg` itself."""
    package = folder_of(name)
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {t for t in targets if t in MODULES}


def test_the_layers_exist_and_the_top_stays_small():
    assert {"mst_fx.runtime", "mst_fx.tracing", "mst_fx.inspect", "mst_fx.models", "mst_fx.passes"} <= set(MODULES)
    top = sorted(p.name for p in FOLDERS["mst_fx"].glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_one_of_a_folder_above_its_own(name):
    own = folder_of(name)
    upward = sorted(t for t in imported(name, MODULES[name]) if own.startswith(folder_of(t) + "."))
    assert not upward, f"{name} (in {own}) imports {upward}, of a folder above its own"


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule above can fail: a runtime module importing the options is caught."""
    MODULES["mst_fx.runtime.probe"] = probe = tmp_path / "probe.py"
    try:
        probe.write_text("def f():\n    from mst_fx.options import MstOptions\nfrom .. import options\n")
        assert imported("mst_fx.runtime.probe", probe) == {"mst_fx.options"}
    finally:
        del MODULES["mst_fx.runtime.probe"]


def test_each_layer_says_what_it_may_import():
    for package in ("mst_fx.runtime", "mst_fx.tracing", "mst_fx.inspect", "mst_fx.models", "mst_fx.passes"):
        doc = ast.get_docstring(ast.parse(MODULES[package].read_text())) or ""
        assert "import" in doc, f"{package}/__init__.py's docstring should say what it may import"
