"""The layout's contract (docs/DESIGN.md): cheap imports, one home per name, one facade, no path hacks.

Each check reads the source or imports in a fresh interpreter, so it fails when a later change breaks the rule:
a module-level `import transformers` in the DiT, a constant defined a second time, a re-export kept "for existing
callers", a test importing another test module, a `sys.path` edit in library code.
"""

from __future__ import annotations

import ast
import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

import phantom_core

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "phantom_core"
HEAVY = ("transformers", "sentencepiece", "imageio_ffmpeg", "requests", "open_clip")
MAX_LINES = 400  # one sitting (CONVENTIONS.md)
MAX_TOP_LEVEL = 15
SYS_PATH_ALLOWED = {"__init__.py"}  # the ComfyUI entry point, which makes `phantom_core` importable for nodes/


def modules(folder: Path = CORE) -> list[str]:
    """Dotted names of every module under ``folder`` (packages as their name)."""
    out = []
    for f in sorted(folder.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def heavy_after_import(names: list[str]) -> list[str]:
    """The HEAVY packages loaded once ``names`` are imported, in a fresh interpreter."""
    code = (f"import importlib, json, sys\nfor n in {names!r}: importlib.import_module(n)\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_loads_nothing_heavy():
    assert heavy_after_import(["phantom_core"]) == []


@pytest.mark.parametrize("folder", ["wan", "sampling", "loading", "world", "mmdit"])
def test_network_sampling_loading_and_world_modules_load_no_text_or_video_library(folder):
    assert heavy_after_import(modules(CORE / folder)) == []


def test_every_public_name_resolves_to_its_one_home():
    for name in phantom_core.__all__:
        value = getattr(phantom_core, name)
        home = phantom_core._HOMES[name]
        defined_in = getattr(value, "__module__", None)
        if callable(value) and defined_in is not None:
            assert defined_in == home, f"{name}: defined in {defined_in}, listed under {home}"
        assert name in top_level_definitions(module_path(home)), f"{name} is not defined in {home}"


def module_path(dotted: str) -> Path:
    path = ROOT.joinpath(*dotted.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def top_level_definitions(path: Path) -> set[str]:
    """Names a module defines itself: functions, classes and assignments at module level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_no_name_is_defined_in_two_modules():
    homes = collections.defaultdict(list)
    for path in CORE.rglob("*.py"):
        for name in top_level_definitions(path) - {"__all__"}:
            homes[name].append(str(path.relative_to(ROOT)))
    twice = {name: paths for name, paths in homes.items() if len(paths) > 1}
    assert not twice, f"names with several homes: {twice}"


def test_no_module_re_exports_another_modules_names():
    """A name imported from another phantom_core module must be used by the importing module itself."""
    for path in CORE.rglob("*.py"):
        if path == CORE / "__init__.py":
            continue  # the facade (lazy, PEP 562)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("phantom_core") for alias in node.names}
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert imported <= used, f"{path.relative_to(ROOT)} imports without using: {sorted(imported - used)}"
        assert "__all__" not in top_level_definitions(path), f"{path.relative_to(ROOT)}: only the facade has __all__"


def test_one_command_line_parser():
    defining = [str(p.relative_to(ROOT)) for p in CORE.rglob("*.py") if "build_parser" in top_level_definitions(p)]
    assert defining == ["phantom_core/__main__.py"]


def test_no_sys_path_edits_outside_the_entry_point():
    for path in [*ROOT.glob("*.py"), *(ROOT / d for d in ("phantom_core", "nodes", "tools", "tests", "benchmarks"))]:
        for f in [path] if path.is_file() else path.rglob("*.py"):
            rel = str(f.relative_to(ROOT))
            if rel in SYS_PATH_ALLOWED:
                continue
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                    pytest.fail(f"{rel}:{node.lineno} uses sys.path (only {sorted(SYS_PATH_ALLOWED)} may)")


def test_tests_import_no_other_test_module():
    for f in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                leaf = name.split(".")[-1]
                assert not leaf.startswith("test_") and leaf != "conftest", f"{f.relative_to(ROOT)} imports {name}"


def test_files_are_short_and_the_package_top_level_small():
    long = [f"{f.relative_to(ROOT)} ({n})" for d in ("phantom_core", "nodes", "tools") for f in (ROOT / d).rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines: {long}"
    entries = [p.name for p in CORE.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= MAX_TOP_LEVEL, sorted(entries)
