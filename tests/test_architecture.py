"""House rule 1: the core imports neither the web UI (`modules.*`) nor gradio; only ui/, host/ and app.py may."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lib_lora"
ALLOWED = ("ui", "host")
FORBIDDEN = ("gradio", "modules", "modules_forge")


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_core_never_imports_host_or_gradio():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ALLOWED or rel.as_posix() == "app.py":
            continue
        for name in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if name.split(".")[0] in FORBIDDEN:
                offenders.append(f"{rel}: import {name}")
    assert not offenders, "core modules import the host or gradio:\n" + "\n".join(offenders)


def test_modules_stay_small():
    big = [f"{p.relative_to(ROOT)}: {n}" for p in ROOT.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500]
    assert not big, "modules over 500 lines (split by responsibility): " + ", ".join(big)


WEBUI_ONLY = ("modules", "modules_forge", "backend", "networks", "network", "extra_networks_lora")
ADAPTERS = ("host/a1111.py", "host/a1111_train.py", "host/forge.py")


def test_only_the_adapters_import_the_web_ui():
    """The web UI's own packages (and its built-in LoRA's modules) are imported by a1111.py, a1111_train.py and
    forge.py only; the extension's scripts/ import nothing but lib_lora."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ADAPTERS:
            continue
        for name in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if name.split(".")[0] in WEBUI_ONLY:
                offenders.append(f"{rel}: import {name}")
    for path in (ROOT.parent / "scripts").glob("*.py"):
        names = set(_imports(ast.parse(path.read_text(encoding="utf-8"))))
        offenders += [f"scripts/{path.name}: import {n}" for n in names if n.split(".")[0] not in ("lib_lora",
                                                                                                 "__future__")]
    assert not offenders, "\n".join(offenders)
