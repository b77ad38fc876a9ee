"""Lines of code per layer of the rlpipe package, at a git revision or in the work tree.

    python benchmarks/layers.py                 # the work tree, by layer (docs/architecture.md §1)
    python benchmarks/layers.py --rev 4b41319   # an earlier commit, by top-level folder or module
    python benchmarks/layers.py --json

Two counts per group: all lines (``wc -l``) and code lines — lines holding
code, without blank lines, comments and docstrings.  Docstrings are a large
share of rlpipe (every protocol documents what an implementation must
guarantee), so the second count is the one that measures how much a layer
*does*.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import subprocess
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Layer folders, top to bottom (pyproject.toml's contract).
LAYERS = ("cli", "app", "roles", "plugins", "models", "runtime", "core")


def code_lines(source: str) -> int:
    """Lines with code: not blank, not only a comment, not inside a docstring."""
    tree = ast.parse(source)
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                doc_lines.update(range(first.lineno, first.end_lineno + 1))
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
            tokenize.ENCODING}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - doc_lines)


def group_of(path: str) -> str:
    """``rlpipe/core/x.py`` -> ``core``; a top-level module -> its file name."""
    parts = Path(path).parts[1:]
    return parts[0] if len(parts) > 1 else parts[0]


def files(rev: str | None) -> dict[str, str]:
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "rlpipe").rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "rlpipe"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout for n in names if n.endswith(".py")}


def count(rev: str | None) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"files": 0, "lines": 0, "code": 0})
    for path, text in files(rev).items():
        g = out[group_of(path)]
        g["files"] += 1
        g["lines"] += len(text.splitlines())
        g["code"] += code_lines(text)
    order = [name for name in LAYERS if name in out] + sorted(k for k in out if k not in LAYERS)
    return {k: out[k] for k in order}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="a git revision (default: the work tree)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    table = count(args.rev)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print("| group | files | lines | code lines |\n|---|---:|---:|---:|")
    for name, c in table.items():
        print(f"| {name} | {c['files']} | {c['lines']} | {c['code']} |")
    total = {k: sum(c[k] for c in table.values()) for k in ("files", "lines", "code")}
    print(f"| total | {total['files']} | {total['lines']} | {total['code']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
