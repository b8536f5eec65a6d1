"""The layout issue 17 set (docs/architecture.md): small files and functions outside tests/ and
bench/, every probe in its own folder, and the package list that ships them complete."""

from __future__ import annotations

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = ("daemon", "probes", "bpf", "dashboards", "deploy", "dpwatch")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def sources(exts=(".py", ".c", ".h")):
    for top in SHIPPED:
        for base, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in sorted(files):
                if f.endswith(exts):
                    yield os.path.join(base, f)


def test_no_file_over_500_lines():
    long = {os.path.relpath(p, REPO): n for p in sources()
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_60_lines():
    long = {}
    for path in sources((".py",)):
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_probe_has_its_folder_and_its_params():
    from dpwatch.probes.registry import PROBES
    for probe in PROBES:
        folder = os.path.join(REPO, "probes", probe.name)
        assert os.path.isfile(os.path.join(folder, "probe.py")), probe.name
        assert os.path.isfile(os.path.join(folder, "params.py")), probe.name
        assert probe.__module__ == f"dpwatch.probes.{probe.name}.probe", probe.__module__
        if probe.bpf_source:
            assert probe.bpf_source == f"{probe.name}.c", probe.bpf_source


def test_every_package_is_shipped():
    """pyproject.toml lists each package folder (a wheel without one would fail to import)."""
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as fh:
        text = fh.read()
    listed = set(re.findall(r'"(dpwatch(?:\.[a-z_]+)*)"', text.split("[tool.setuptools]")[1].split("[")[0]
                            + text.split("packages = [")[1].split("]")[0]))
    want = {"dpwatch"}
    for top in ("daemon", "probes", "bpf"):
        for base, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(base, REPO).split(os.sep)
                want.add(".".join(["dpwatch"] + rel))
    assert want <= listed, f"packages missing from pyproject.toml: {sorted(want - listed)}"
