"""docs/findings.md and the code list the same finding ids.

- The ids documented (one `### <a id="..."></a>id` heading each) equal every registered
  probe's `finding_ids` plus triage's own TRIAGE_FINDING_IDS.
- Every id the code can emit (each Finding(...)/Result(...) built with a literal id in
  probes/, daemon/triage.py and probes/node/audit.py, found by walking the source's syntax
  tree) is declared by its probe, so build_report never meets an undeclared id.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

from dpwatch.daemon import triage
from dpwatch.probes.registry import PROBES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(REPO, "docs", "findings.md")
HEADING = re.compile(r'^### <a id="([^"]+)"></a>(\S+)\s*$')


def documented() -> dict[str, str]:
    """id -> its section text."""
    sections: dict[str, str] = {}
    current = None
    with open(DOC, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#"):
                current = None
            m = HEADING.match(line)
            if m:
                anchor, fid = m.groups()
                assert anchor == fid.replace(".", "-"), f"anchor {anchor!r} does not match {fid!r}"
                assert fid not in sections, f"{fid} documented twice"
                current = fid
                sections[fid] = ""
            elif current:
                sections[current] += line
    return sections


def declared() -> dict[str, str]:
    out = {}
    for cls in PROBES:
        for fid in cls.finding_ids:
            assert fid not in out, f"{fid} declared by {out.get(fid)} and {cls.name}"
            out[fid] = cls.name
    for fid in triage.TRIAGE_FINDING_IDS:
        out[fid] = "triage"
    return out


def test_doc_and_code_list_the_same_ids():
    doc, code = set(documented()), set(declared())
    assert doc - code == set(), "documented but no probe declares them"
    assert code - doc == set(), "declared but not documented in docs/findings.md"
    assert len(doc) >= 30


def test_every_section_has_trigger_evidence_and_fix():
    for fid, text in documented().items():
        for part in ("**Trigger:**", "**Evidence:**"):
            assert part in text, f"{fid}: no {part}"
        assert "**Fix:**" in text, f"{fid}: no **Fix:**"


def test_ids_have_the_probe_prefix_shape():
    for fid in declared():
        assert re.fullmatch(r"[a-z]+\.[a-z0-9_]+", fid), fid


def _emitted_ids(path: str) -> set[str]:
    """Literal ids of Finding(...) and Result(...) calls in one source file."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", getattr(node.func, "attr", ""))
        if name not in ("Finding", "Result"):
            continue
        args = [kw.value for kw in node.keywords if kw.arg == "id"] + node.args[:1]
        for a in args:
            if isinstance(a, ast.Constant) and isinstance(a.value, str):
                out.add(a.value)
            elif isinstance(a, ast.JoinedStr):
                pytest.fail(f"{path}: a finding id built at run time cannot be checked: {ast.unparse(a)}")
    return out


def test_every_emitted_id_is_declared():
    decl = declared()
    sources = sorted(os.path.join(base, f) for base, _, files in os.walk(os.path.join(REPO, "probes"))
                     for f in files if f.endswith(".py"))
    sources += sorted(os.path.join(base, f) for base, _, files in os.walk(os.path.join(REPO, "daemon"))
                      for f in files if f.endswith(".py"))
    seen = set()
    for path in sources:
        for fid in _emitted_ids(path):
            seen.add(fid)
            assert fid in decl, f"{os.path.relpath(path, REPO)} emits {fid}, which no probe declares"
    # The walk finds real ids (so this test can fail): the drops, node and triage ones at least.
    assert {"drops.netfilter", "node.somaxconn_low", "netfilter.rule_count_high",
            "triage.dns_conntrack_race"} <= seen
