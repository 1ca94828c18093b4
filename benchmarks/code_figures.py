"""The code review's figures for the production code (shared/, services/, workers/; issue 23): the longest
functions, the highest cyclomatic complexity, the function-level imports (and how many carry no comment saying
what they guard), and the bare job-status literals, for this tree and optionally for a baseline commit.

    python benchmarks/code_figures.py [--baseline REV] [--json benchmarks/results/code_figures.json]

Complexity is McCabe's, counted as mccabe/radon do: 1 per function, +1 per if/elif, for, while, except, with a
condition in a comprehension, a boolean operator's extra operands, an assert, a ternary and a match case. Nested
functions count on their own. The baseline is read from ``git show REV:path`` (nothing is checked out).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("shared", "services", "workers")
STATUS_WORDS = {"queued", "running", "canceling", "succeeded", "failed", "canceled"}


@dataclass
class Function:
    where: str
    lines: int
    complexity: int


def _complexity(node: ast.AST) -> int:
    score = 1
    for child in _walk_own(node):
        branches = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.IfExp, ast.Assert, ast.ExceptHandler, ast.match_case)
        if isinstance(child, branches):
            score += 1
        elif isinstance(child, ast.BoolOp):
            score += len(child.values) - 1
        elif isinstance(child, ast.comprehension):
            score += 1 + len(child.ifs)
    return score


def _walk_own(node: ast.AST):
    """The nodes of a function's body, not descending into nested functions or classes."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        yield child
        stack.extend(ast.iter_child_nodes(child))


def figures(files: dict[str, str]) -> dict:
    functions: list[Function] = []
    local_imports = uncommented = 0
    modules_with_local_imports = set()
    status_literals = 0
    for path, source in sorted(files.items()):
        tree = ast.parse(source)
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append(Function(f"{path}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1,
                                          _complexity(node)))  # fmt: skip
                imports = [c for c in _walk_own(node) if isinstance(c, ast.Import | ast.ImportFrom)]
                covered = {n for c in imports for n in range(c.lineno, c.end_lineno + 1)}
                for child in imports:
                    local_imports += 1
                    modules_with_local_imports.add(path)
                    # Commented: on its own lines, or on the line above the run of imports it stands in.
                    above = child.lineno - 1
                    while above in covered and "#" not in lines[above - 1]:
                        above -= 1
                    own = any("#" in lines[n - 1] for n in range(child.lineno, child.end_lineno + 1))
                    if not own and not lines[above - 1].strip().startswith("#") and "#" not in lines[above - 1]:
                        uncommented += 1
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value in STATUS_WORDS
                and "/db/" not in path  # the enum's own definition
            ):
                status_literals += 1
    by_lines = sorted(functions, key=lambda f: -f.lines)
    by_complexity = sorted(functions, key=lambda f: -f.complexity)
    return {
        "files": len(files),
        "functions": len(functions),
        "longest": [vars(f) for f in by_lines[:5]],
        "most_complex": [vars(f) for f in by_complexity[:5]],
        "functions_over_60_lines": sum(f.lines > 60 for f in functions),
        "functions_over_complexity_15": sum(f.complexity > 15 for f in functions),
        "function_level_imports": local_imports,
        "function_level_imports_without_comment": uncommented,
        "modules_with_function_level_imports": len(modules_with_local_imports),
        "bare_status_literals": status_literals,
    }


def _tree_files() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}


def _commit_files(rev: str) -> dict[str, str]:
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, *FOLDERS], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    show = ["git", "show"]
    return {
        name: subprocess.run([*show, f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        for name in names
        if name.endswith(".py")
    }


def _commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a commit to compare with (e.g. the one the review read)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    runs = {f"HEAD ({_commit()}, working tree)": figures(_tree_files())}
    if args.baseline:
        runs[args.baseline] = figures(_commit_files(args.baseline))
    names = list(runs)
    rows = [
        ("files", "files"),
        ("functions", "functions"),
        ("longest function (lines)", lambda r: f"{r['longest'][0]['lines']} ({r['longest'][0]['where']})"),
        ("highest complexity", lambda r: f"{r['most_complex'][0]['complexity']} ({r['most_complex'][0]['where']})"),
        ("functions > 60 lines", "functions_over_60_lines"),
        ("functions of complexity > 15", "functions_over_complexity_15"),
        ("function-level imports", "function_level_imports"),
        ("  of those without a comment", "function_level_imports_without_comment"),
        ("  modules with any", "modules_with_function_level_imports"),
        ("bare status literals", "bare_status_literals"),
    ]
    print("| figure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, key in rows:
        cells = [key(runs[n]) if callable(key) else str(runs[n][key]) for n in names]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
