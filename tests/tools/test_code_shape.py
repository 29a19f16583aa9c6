"""The code's shape, as the project keeps it: short classes and functions, no two modules that
import each other, and ruff's lint and format rules (pyproject.toml)."""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "onebit"
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _spans(tree: ast.AST, kinds: tuple[type, ...]):
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The package's modules ``name`` imports, anywhere in it (functions and TYPE_CHECKING blocks
    included); ``from package import module`` counts as importing the module, not the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def test_no_class_is_longer_than_the_limit():
    long = [
        f"{path.relative_to(ROOT)}:{line} class {cls} ({n} lines)"
        for path in MODULES.values()
        for cls, line, n in _spans(ast.parse(path.read_text()), (ast.ClassDef,))
        if n > MAX_CLASS_LINES
    ]
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"


def test_no_function_is_longer_than_the_limit():
    long = [
        f"{path.relative_to(ROOT)}:{line} {fn} ({n} lines)"
        for path in MODULES.values()
        for fn, line, n in _spans(ast.parse(path.read_text()), (ast.FunctionDef, ast.AsyncFunctionDef))
        if n > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_two_modules_import_each_other():
    imports = {name: _imports(name, path) for name, path in MODULES.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in imports.items() for b in deps if a in imports.get(b, ())})
    assert not pairs, f"modules that import each other: {pairs}"


def test_the_import_finder_sees_imports_inside_functions(tmp_path):
    """The cycle check's own reference: a module importing another inside a function counts."""
    probe = PACKAGE / "engine" / "packed.py"
    assert "onebit.engine.fuse" in _imports("onebit.engine.packed", probe)
    assert _imports("onebit.engine.graph.validate", PACKAGE / "engine" / "graph" / "validate.py") >= {
        "onebit.engine.graph.ops",
        "onebit.engine.graph.schema",
    }


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (pathlib.Path(sys.executable).parent / "ruff").exists(),
    reason="ruff is not installed (make installs it with the test extra)",
)
@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(command):
    ruff = pathlib.Path(sys.executable).parent / "ruff"
    result = subprocess.run(
        [str(ruff) if ruff.exists() else "ruff", *command], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
