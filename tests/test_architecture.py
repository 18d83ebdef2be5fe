"""Structure rules a reviewer would otherwise check by hand (docs/architecture.md).

Each rule is an AST walk over the installed package's source, so a violation names the file and line.
"""

from __future__ import annotations

import ast
import builtins
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_tda

PACKAGE = Path(lightning_tda.__file__).parent
MAX_FUNCTION_LINES = 80
MAX_LOGGER_INIT_LINES = 60


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _length(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_library_function_is_longer_than_a_screen():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.name} ({_length(fn)} lines)"
        for path, tree in _modules()
        for fn in _functions(tree)
        if _length(fn) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_gradient_logger_init_is_short():
    from lightning_tda.callbacks import gradient_logger

    tree = ast.parse(Path(gradient_logger.__file__).read_text())
    cls = next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "GradientLogger"
    )
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    assert _length(init) <= MAX_LOGGER_INIT_LINES, _length(init)


def test_the_function_length_check_can_fail():
    tree = ast.parse("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert [_length(f) for f in _functions(tree)] == [MAX_FUNCTION_LINES + 1]


def test_library_modules_never_import_the_package_root():
    """``from lightning_tda import X`` inside the library imports every layer; use the module itself."""
    bad = []
    for path, tree in _modules():
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "lightning_tda"
                and node.level == 0
            ):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name == "lightning_tda" for a in node.names):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not bad, bad


def test_every_exception_class_lives_in_the_errors_module():
    builtin_errors = {
        name
        for name, obj in vars(builtins).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    known = builtin_errors | {"MisconfigurationException"}
    bad = []
    for path, tree in _modules():
        if path.name == "errors.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if bases & known or any(b.endswith(("Error", "Exception")) for b in bases):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert not bad, f"exception classes outside lightning_tda/errors.py: {bad}"


def test_import_layers_contract_holds():
    """The import-linter contract in pyproject.toml (layer order: docs/architecture.md)."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (it is in the dev extra)")
    root = PACKAGE.parent
    if not (root / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    out = subprocess.run([str(lint)], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
