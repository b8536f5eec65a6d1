"""--help before and after the params refactor (issue 17): the flags generated from the probes'
declarations are the flags that were kept by hand, with the same defaults. The fixtures under
tests/unit/fixtures/help/ are the help texts of the hand-kept parser (commit 269414c); a flag may
gain help text or move to a better group, but none may vanish or change its default."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
OPTION = re.compile(r"^\s{2}(--[a-z0-9-]+)")


def options(text: str) -> dict[str, str | None]:
    """{--flag: default shown in its help, or None} from an argparse --help text."""
    out: dict[str, str | None] = {}
    current = None
    for line in text.splitlines():
        m = OPTION.match(line)
        if m:
            current = m.group(1)
            out[current] = None
        elif not line.strip() or not line.startswith("  "):
            current = None
        if current:
            d = re.search(r"\(default: ([^)]*)\)", line)
            if d:
                out[current] = d.group(1)
    # a default split over two lines ("(default:\n 5s)") is rare; read it from the whole text too
    joined = re.sub(r"\s+", " ", text)
    for flag in out:
        if out[flag] is None:
            d = re.search(re.escape(flag) + r" [A-Z_]+ [^-]*?\(default: ([^)]*)\)", joined)
            if d:
                out[flag] = d.group(1)
    return out


def help_of(command: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPWATCH_")}
    env["COLUMNS"] = "100"
    args = [command, "--help"] if command != "top" else ["--help"]
    run = subprocess.run([sys.executable, "-m", "dpwatch.daemon.cli", *args], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.parametrize("command", ["run", "check", "diagnose"])
def test_every_flag_and_default_is_kept(command):
    with open(os.path.join(HERE, "fixtures", "help", f"{command}.txt"), encoding="utf-8") as fh:
        before = options(fh.read())
    after = options(help_of(command))
    assert len(before) > 20  # the parse found the flags (so this test can fail)
    missing = sorted(set(before) - set(after))
    assert not missing, f"flags gone from `dpwatch {command} --help`: {missing}"
    changed = {f: (before[f], after[f]) for f in before if before[f] != after[f]}
    assert not changed, f"defaults changed (before, after): {changed}"
    added = sorted(set(after) - set(before))
    assert not added, f"new flags in `dpwatch {command} --help` (add them to the fixture on purpose): {added}"


def test_top_level_help_is_unchanged():
    with open(os.path.join(HERE, "fixtures", "help", "top.txt"), encoding="utf-8") as fh:
        assert help_of("top") == fh.read()
