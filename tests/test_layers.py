"""The package's shape (docs/architecture.md, "Where each piece lives"): imports run one way, driver -> actors ->
pure core, and the repository's actors/ folder installs as apo_ray.actors, never as a top-level `actors`."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The pure core: math, data, config, bookkeeping and the gold oracle. Importable without Ray or any actor.
CORE = {
    "aapa",
    "apl",
    "apo_activity",
    "batching",
    "build_locks",
    "builtin",
    "builtin.assets",
    "builtin.harm",
    "builtin.models",
    "builtin.oracle",
    "builtin.task",
    "chat",
    "config",
    "config_docs",
    "config_paths",
    "data",
    "deadlines",
    "evaluation",
    "fault_injection",
    "fingerprint",
    "flops",
    "game",
    "gguf",
    "logs",
    "losses",
    "mean_pooling",
    "metric_catalog",
    "modeling",
    "named_tensors",
    "package_files",
    "pool_size",
    "ppo",
    "model_sources",
    "progress",
    "lora",
    "seeds",
    "vllm_cpu",
    "vllm_version",
    "config_section",
    "methods",
    # Every method module, a new one included: the learners read their losses from them.
    *(f"methods.{path.stem}" for path in ROOT.glob("apo_ray/methods/*.py") if path.stem != "__init__"),
}


# The weight-sync backends (apo_ray/sync_backends/): each module holds the driver's, the learner's and the worker's
# side of one backend and its declarations. The config (core), the actors and the driver read them, so at import
# time a backend imports only the core (the config and the learners get the declarations without Ray); inside the
# functions of a side it may import what runs on that side: Ray and vLLM, the driver's `gather`
# (apo_ray.learner_group) and the learner's free port (apo_ray.actors.engine).
SYNC = {
    "sync_backends",
    *(f"sync_backends.{path.stem}" for path in ROOT.glob("apo_ray/sync_backends/*.py") if path.stem != "__init__"),
}
SYNC_SIDES = {"apo_ray.learner_group", "apo_ray.actors.engine"}


def module_name(path: Path) -> str:
    """apo_ray's name for a source file (actors/x.py is apo_ray.actors.x)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "actors":
        parts = ["apo_ray", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


SOURCES = {module_name(p): p for p in [*ROOT.glob("apo_ray/**/*.py"), *ROOT.glob("actors/*.py")]}
ACTORS = {name for name in SOURCES if name.startswith("apo_ray.actors.")}


def is_core(name: str) -> bool:
    return name.removeprefix("apo_ray.") in CORE


def is_sync(name: str) -> bool:
    return name.removeprefix("apo_ray.") in SYNC


def test_the_core_list_names_real_modules():
    assert {f"apo_ray.{m}" for m in CORE} <= set(SOURCES)
    assert {f"apo_ray.{m}" for m in SYNC} <= set(SOURCES) and len(SYNC) >= 4
    assert len(ACTORS) >= 7


@pytest.mark.parametrize("module", sorted(f"apo_ray.{m}" for m in CORE))
def test_core_imports_neither_ray_nor_actors_nor_the_driver(module):
    bad = sorted(
        name
        for name in imported_modules(SOURCES[module])
        if name == "ray"
        or name.startswith("ray.")
        or (name.startswith("apo_ray.") and not (is_core(name) or is_sync(name)))
    )
    assert not bad, f"{module} is pure core but imports {bad}"


@pytest.mark.parametrize("module", sorted(ACTORS))
def test_actors_import_only_the_core_and_each_other(module):
    bad = sorted(
        name
        for name in imported_modules(SOURCES[module])
        if name.startswith("apo_ray.") and not (is_core(name) or is_sync(name) or name in ACTORS)
    )
    assert not bad, f"{module} is an actor module but imports driver modules {bad}"


@pytest.mark.parametrize("module", sorted(f"apo_ray.{m}" for m in SYNC))
def test_a_sync_backend_imports_the_core_when_imported_and_a_sides_helpers_where_it_runs(module):
    at_import = import_time_modules(SOURCES[module])
    bad_at_import = sorted(
        name
        for name in at_import
        if name.split(".")[0] in ("ray", "vllm")
        or (name.startswith("apo_ray.") and not (is_core(name) or is_sync(name)))
    )
    assert not bad_at_import, f"{module} is a sync backend but imports {bad_at_import} when imported"
    bad = sorted(
        name
        for name in imported_modules(SOURCES[module])
        if name.startswith("apo_ray.") and not (is_core(name) or is_sync(name) or name in SYNC_SIDES)
    )
    assert not bad, f"{module} is a sync backend but imports {bad}"


def test_nothing_imports_a_top_level_actors_package():
    offenders = sorted(
        str(path.relative_to(ROOT))
        for path in [*SOURCES.values(), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
        if any(name == "actors" or name.startswith("actors.") for name in imported_modules(path))
    )
    assert not offenders


def test_the_wheel_installs_actors_as_apo_ray_actors(tmp_path):
    """Build the wheel as pip would and look inside: actors/ lands at apo_ray/actors/, no top-level actors/."""
    # Without setuptools in this environment pip builds in isolation (fetching it from PyPI, as CI can).
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("apo_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "apo_ray/actors/policy.py" in names and "apo_ray/actors/rollout.py" in names
    assert not [n for n in names if n.startswith("actors/")]
    assert "apo_ray/builtin/oracle.py" in names and "apo_ray/stages/runner.py" in names
    assert "apo_ray/methods/ipo.py" in names and "apo_ray/sync_backends/nccl.py" in names


def test_local_ray_workers_get_the_drivers_apo_ray_first(monkeypatch):
    from apo_ray.ray_env import driver_source_env

    monkeypatch.setenv("PYTHONPATH", f"/elsewhere{os.pathsep}{ROOT}")
    assert driver_source_env()["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]


# The learner classes are plain classes that Ray wraps as actors, so that they also run in-process on a machine
# without Ray or vLLM (benchmarks/gpu_learners.py; its CPU check, in tests/test_gpu_learners.py, looks at what a
# real run imported).
LEARNERS = [
    "apo_ray.actors.engine",
    "apo_ray.actors.policy",
    "apo_ray.actors.reward",
    "apo_ray.actors.critic",
    "apo_ray.actors.reference",
    "apo_ray.actors.discriminator",
]


def import_time_modules(path: Path) -> set[str]:
    """The modules `path` imports when it is imported: its imports outside functions."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from apo_ray import build_locks` imports the submodule.
            names.update(
                f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in SOURCES
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


@pytest.mark.parametrize("module", LEARNERS)
def test_importing_a_learner_imports_neither_ray_nor_vllm(module):
    seen, todo, outside = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in import_time_modules(SOURCES[name]):
            if imported in SOURCES:
                todo.append(imported)
            else:
                outside.add(imported.split(".")[0])
    assert not outside & {"ray", "vllm"}, f"importing {module} imports {sorted(outside & {'ray', 'vllm'})}"
