"""The layout of DESIGN.md holds: import directions, torch-free foundations, one top-level package."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "mergekit_sparse"
# What each part of the library may import from the library (itself always). `errors` and `settings`
# are the shared leaves. Sideways edges in the middle layer are listed one by one: fusion computes
# cores on the fly (analysis) and checks its output with a model load (evaluation); training reads
# groups files (analysis); evaluation reads data and loads models like training does.
ALLOWED = {
    "errors": set(),
    "settings": {"errors"},
    "builtin": {"errors"},
    "storage": {"errors", "settings"},
    "selection": {"errors", "settings", "storage"},
    "analysis": {"errors", "settings", "storage", "selection"},
    "training": {"errors", "settings", "storage", "selection", "analysis"},
    "evaluation": {"errors", "settings", "storage", "training"},
    "fusion": {"errors", "settings", "storage", "selection", "analysis", "evaluation"},
    "pipeline": {
        "errors",
        "settings",
        "storage",
        "selection",
        "analysis",
        "training",
        "evaluation",
        "fusion",
        "builtin",
    },
}
TORCH_FREE = ("storage", "selection", "analysis", "fusion")
FOREIGN = ("click", "plotly")  # the CLI's and the reports' packages: never in the library


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("cli", "reports"):
        parts = ["mergekit_sparse", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, nested ones included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if not node.module or node.level]
    return out


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mergekit_sparse" and len(parts) > 1 else None


def test_library_imports_point_down_the_layers_and_never_reach_the_cli_or_reports():
    bad = []
    for path in sorted(LIB.rglob("*.py")):
        if path.name == "__main__.py":  # entry points, like the console script
            continue
        here = _part(_module_name(path)) if path != LIB / "__init__.py" else "errors"
        for line, mod in _imports(path):
            there = _part(mod)
            where = f"{path.relative_to(ROOT)}:{line} imports {mod}"
            if mod.split(".")[0] in FOREIGN or there in ("cli", "reports"):
                bad.append(where + " (the library never imports the CLI, the reports, click or plotly)")
            elif there is not None and there != here and there not in ALLOWED[here]:
                bad.append(where + f" ({here} may import {sorted(ALLOWED[here])})")
    assert not bad, "\n".join(bad)


def test_every_library_part_is_known_to_the_layering_rules():
    parts = {
        p.stem if p.is_file() else p.name
        for p in LIB.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists())
        or (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
    }
    assert parts == set(ALLOWED), parts ^ set(ALLOWED)


def test_cli_and_reports_are_imported_under_the_library_name_only():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for top in ("mergekit_sparse", "cli", "reports", "tests", "bench")
        for p in sorted((ROOT / top).rglob("*.py"))
        if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)  # venvs, caches
        for line, mod in _imports(p)
        if mod.split(".")[0] in ("cli", "reports")
    ]
    assert not bad, "\n".join(bad)


def test_no_module_is_named_like_a_standard_library_module():
    clash = [
        str(p.relative_to(ROOT))
        for top in ("mergekit_sparse", "cli", "reports")
        for p in (ROOT / top).rglob("*")
        if (p.suffix == ".py" or p.is_dir()) and p.stem in sys.stdlib_module_names and p.stem != "__main__"
    ]
    assert not clash, clash


def test_storage_selection_analysis_and_fusion_never_load_torch():
    modules = [_module_name(p) for part in TORCH_FREE for p in sorted((LIB / part).rglob("*.py"))]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    assert 'torch' not in sys.modules, m + ' loaded torch'\n"
        "print('ok', len(sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
    assert len(modules) >= 15


def test_the_installed_distribution_has_one_top_level_package():
    top = importlib.metadata.distribution("mergekit-sparse").read_text("top_level.txt")
    assert top is not None and top.split() == ["mergekit_sparse"]


def test_a_wheel_ships_one_top_level_package_with_the_cli_and_reports_inside(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("mergekit_sparse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["mergekit_sparse"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"mergekit_sparse"}
    for must in (
        "mergekit_sparse/cli/main.py",
        "mergekit_sparse/reports/overlap.py",
        "mergekit_sparse/builtin/assets/tiny-base/model.safetensors",
        "mergekit_sparse/__main__.py",
    ):
        assert must in names, must


COMMANDS = (
    "demo",
    "run",
    "inspect",
    "core",
    "overlap",
    "fuse",
    "gradients",
    "gallop",
    "train",
    "retrain",
    "eval",
    "forget",
)


@pytest.fixture
def foreign(tmp_path) -> Path:
    """A folder outside the repository holding another distribution's top-level `cli` and `reports`."""
    root = tmp_path / "elsewhere"
    for pkg in ("cli", "reports"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("raise ImportError('the foreign package was imported')\n")
        (root / pkg / "main.py").write_text("raise ImportError('the foreign package was imported')\n")
    return root


def test_python_m_mergekit_sparse_lists_every_command_beside_a_foreign_cli_package(foreign):
    # `python -m` puts the working directory first on sys.path: a folder with its own cli/ and reports/
    env = {**os.environ, "PYTHONPATH": str(foreign)}
    r = subprocess.run(
        [sys.executable, "-m", "mergekit_sparse", "--help"],
        capture_output=True,
        text=True,
        cwd=foreign,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert all(f"  {c} " in r.stdout for c in COMMANDS), r.stdout


def test_the_console_script_works_with_another_top_level_cli_first_on_the_path(foreign):
    env = {**os.environ, "PYTHONPATH": str(foreign)}
    exe = Path(sys.executable).parent / "sparsemerge"
    r = subprocess.run([str(exe), "fuse", "--help"], capture_output=True, text=True, cwd=foreign, env=env, timeout=60)
    assert r.returncode == 0 and "--conflict" in r.stdout, r.stderr
    r = subprocess.run([str(exe), "demo", "--help"], capture_output=True, text=True, cwd=foreign, env=env, timeout=60)
    assert r.returncode == 0 and "built-in" in r.stdout, r.stderr


def test_the_tree_is_formatted_and_lint_clean():
    """ruff (pinned in the dev extra): formatting, import order, and the ban on top-level `cli`/`reports`."""
    ruff = Path(sys.executable).parent / "ruff"
    for args in (["format", "--check", "."], ["check", "."]):
        r = subprocess.run([str(ruff), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
