"""The layer contract of docs/architecture.md §1, enforced.

``lint-imports`` (import-linter, configured in pyproject.toml) checks that each
layer imports only from the layers below it and that no modules import each
other in a cycle; a wrong-way import fails here with the offending line.
Private names (``_name``) are not imported across modules: what two modules
share gets a public name in one of them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlpipe"

#: The layers, top to bottom, as pyproject.toml's contract lists them.
LAYERS = ["cli", "app", "roles", "plugins", "models", "runtime", "core"]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract_and_names_the_line(tmp_path):
    """The contract is not vacuous: a copy of the package with one core module
    importing a role fails, naming the importer, the imported module and the line."""
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "rlpipe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / "rlpipe" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from rlpipe.roles import trainer  # noqa: F401\n")
    result = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                             "sys.exit(lint_imports(no_cache=True))"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "rlpipe.core is not allowed to import rlpipe.roles" in result.stdout
    assert "rlpipe.core.errors -> rlpipe.roles.trainer" in result.stdout


def test_the_contract_lists_every_layer_folder():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    assert layers == [f"rlpipe.{name}" for name in LAYERS]
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert folders == sorted(LAYERS), "a new top-level folder needs a place in the layer contract"


def _private_imports(path: Path) -> list[str]:
    """``from rlpipe.x import _name`` and ``module._name`` for an imported rlpipe module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, hits = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlpipe"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}")
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rlpipe"):
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    return hits


def test_no_private_name_is_imported_across_modules():
    hits = [h for p in sorted(PACKAGE.rglob("*.py")) for h in _private_imports(p)]
    assert not hits, "private names used from another module:\n" + "\n".join(hits)


@pytest.mark.parametrize("name", ["Stage", "Placement", "PlacementPlan", "Batch", "RoleSpec", "Executor", "Trace",
                                  "plan_run", "build_stages", "MemoryEstimate", "hookimpl", "load_registry", "Tracer",
                                  "on_devices", "SamplingParams", "Generation"])
def test_the_public_api_is_reexported_from_the_package(name):
    import rlpipe

    assert name in rlpipe.__all__ and getattr(rlpipe, name) is not None


def _doc_imports() -> list[tuple[str, str]]:
    """``(where, import statement)`` of every rlpipe import in the docs' and
    README's Python code blocks."""
    out = []
    for doc in sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]):
        in_python = False
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                in_python = not in_python and stripped[3:].strip() in ("python", "py")
                continue
            if in_python and (stripped.startswith("from rlpipe") or stripped.startswith("import rlpipe")):
                out.append((f"{doc.relative_to(ROOT)}:{n}", stripped.split("#")[0].strip()))
    return out


def test_every_import_the_docs_teach_works():
    """The layout may move modules, but what docs/*.md tells users to import resolves."""
    assert _doc_imports(), "the docs teach no imports: the scan is broken"
    failures = []
    for where, statement in _doc_imports():
        if statement.endswith("("):  # a multi-line import: check its module only
            statement = statement.split(" import ")[0].replace("from ", "import ")
        try:
            exec(compile(statement, where, "exec"), {})  # noqa: S102 - our own docs
        except Exception as exc:  # noqa: BLE001 - reported together
            failures.append(f"{where}: {statement}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
