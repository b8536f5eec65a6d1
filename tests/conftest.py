"""Shared fixtures. Three tiers:

- tests/unit:   no root, no BPF.
- tests/kernel: real BPF through BCC, as root, with traffic in network namespaces the test makes.
- tests/e2e:    the real daemon process, real traffic, HTTP.

Kernel and e2e tests skip only when not root or when BCC cannot be imported; CI runs as
root with BCC installed, so there they run.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/netlab.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "kernel"))  # shared kernel-tier helpers

from netlab import Lab  # noqa: E402

# Every finding any test produces (in this process, and in the daemons and commands it starts,
# which inherit the environment) is held to its headline: a claimed count that is zero raises
# ContradictionError (probes/base.py), and /diagnose then fails with a 500.
os.environ["DPWATCH_CHECK_CLAIMS"] = "1"

ROOT = os.geteuid() == 0
HAVE_BCC = importlib.util.find_spec("bcc") is not None
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    reason = None
    if not ROOT:
        reason = "needs root to load BPF and create network namespaces"
    elif not HAVE_BCC:
        reason = "needs BCC (Debian python3-bpfcc; venv with --system-site-packages)"
    for item in items:
        path = str(item.fspath)
        tier = "kernel" if f"{os.sep}kernel{os.sep}" in path else "e2e" if f"{os.sep}e2e{os.sep}" in path else None
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def lab():
    with Lab(pods=1) as lab:
        yield lab


@pytest.fixture(scope="session")
def dpwatch_bin() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "dpwatch")
    assert os.path.exists(path), f"{path} missing: run deploy/setup.sh --test"
    return path
