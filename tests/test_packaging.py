"""What the code imports is declared in pyproject.toml, and each image's pins hold what its processes load."""

import ast
import json
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# krona_generated: a test's output; krona_sdk: sdk/python, this repository's own client distribution, which
# `make install` installs next to the project (the `krona` client commands call the API through it; the images run
# no client command)
LOCAL = {"shared", "services", "workers", "benchmarks", "krona_generated", "krona_sdk"}


def _names(lines: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in lines} - {"krona"}


def _declared(*extras: str) -> set[str]:
    return _names(PROJECT["dependencies"]) | set().union(*(_names(PROJECT["optional-dependencies"][e]) for e in extras))


@cache
def _providers() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    """The distributions that provide top-level ``module`` (an uninstalled one: its own name)."""
    return {canonicalize_name(d) for d in _providers().get(module, [module])}


def _imported_modules(folder: str) -> dict[str, str]:
    """Top-level third-party module -> a file of ``folder`` that imports it (at any depth, lazily or not)."""
    local = (
        LOCAL
        | {p.stem for p in (ROOT / folder).rglob("*.py")}
        | {p.name for p in (ROOT / folder).iterdir() if p.is_dir()}
    )
    found: dict[str, str] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize(
    ("folders", "extras"),
    [
        (("shared", "services", "workers", "migrations"), ("gateway", "worker", "adam8bit")),
        (("tests", "benchmarks"), ("gateway", "worker", "adam8bit", "dev")),
    ],
)
def test_every_imported_package_is_declared(folders, extras):
    declared = _declared(*extras)
    undeclared = {
        f"{module} ({where})"
        for folder in folders
        for module, where in _imported_modules(folder).items()
        if not _distributions(module) & declared
    }
    assert not undeclared, f"imported but not in pyproject.toml {sorted(extras)}: {sorted(undeclared)}"


def _closure(requirements: list[Requirement]) -> set[str]:
    """The distributions ``requirements`` install, with their dependencies (markers evaluated here)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(requirement.name) or []:
            dependency = Requirement(line)
            wanted = requirement.extras or {""}
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(dependency)
    return {name for name, _ in seen}


def _pins(image: str) -> list[Requirement]:
    lines = (ROOT / f"deploy/docker/requirements-{image}.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


# Each image's processes, imported in a fresh interpreter: the top-level modules they load beyond a bare start.
LOADED = """
import json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
"""
IMAGES = {
    # The gateway image runs the gateway, the webhook worker (with its reaper thread) and `krona migrate`.
    "gateway": ["services.gateway.app", "workers.tasks", "workers.webhooks", "workers.reaper", "services.cli.stack"],
    # The worker image runs the train/infer workers and the migrate job; torch comes from its Dockerfile.
    "worker": ["workers.tasks", "workers.training.job", "workers.inference.job", "services.cli.stack"],
}


@pytest.mark.parametrize("image", IMAGES)
def test_each_images_pins_hold_what_its_processes_import(image):
    out = subprocess.run(
        [sys.executable, "-c", LOADED, *IMAGES[image]], capture_output=True, text=True, cwd=ROOT, check=True
    )
    extra = [Requirement("torch")] if image == "worker" else []
    available = _closure(_pins(image) + extra)
    # Only packages this project declares somewhere (a library's optional import of something that happens to
    # be installed here is not the image's concern): e.g. torch or psutil reaching the gateway.
    ours = _declared("gateway", "worker", "adam8bit", "dev") | {"torch"}
    missing = {
        f"{module} ({', '.join(sorted(dists))})"
        for module in json.loads(out.stdout)
        if (dists := _distributions(module)) & ours and not dists & available
    }
    assert not missing, f"the {image} image's processes import packages it does not install: {sorted(missing)}"
