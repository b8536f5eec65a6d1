"""End-to-end: schemathesis over the real daemon's own OpenAPI spec (/openapi.json), every
operation: generated requests (query strings, headers, methods) must never get a 5xx, every
answer's status code, content type and body must match the spec, and no operation other than
GET/HEAD exists.

The daemon runs in the test's own network namespace view (host netns, 127.0.0.1, a free port)
because schemathesis calls it from this process; it is started once per module with every
probe that loads here and a low drop threshold, so /diagnose has real findings to validate.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from test_daemon_e2e import DaemonProc

# HTTP behaviour only: not rerun in the 6.1 guest (make test-kernels), where it is slow under emulation.
pytestmark = pytest.mark.host_only

REQUIRED_OPERATIONS = {"GET /", "GET /metrics", "GET /probes", "GET /diagnose", "GET /healthz", "GET /readyz"}


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def daemon_url(dpwatch_bin):
    d = DaemonProc(dpwatch_bin, None, _free_port(), "--drops-rate-warning", "0.1")
    try:
        d.wait_ready()
        # Some drops (NO_SOCKET on loopback), so /diagnose has findings with evidence.
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed = _free_port()
        for _ in range(200):
            try:
                s.sendto(b"x", ("127.0.0.1", closed))
            except OSError:
                pass
        s.close()
        time.sleep(1.5)
        yield f"http://127.0.0.1:{d.port}"
    finally:
        rc = d.stop(20)
        out = d.output()
        assert rc == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]


def test_every_operation_conforms(daemon_url):
    """Every operation of the served spec, up to 60 generated cases each (positive and
    negative data, as schemathesis generates by default), with schemathesis' default checks:
    not_a_server_error, status_code_conformance, content_type_conformance,
    response_headers_conformance, response_schema_conformance, ...
    positive_data_acceptance is excluded: `window` is a string in the spec, and a string that
    is not a duration (or one beyond --max-window) is documented as 400 with an error body."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance
    schema = schemathesis.openapi.from_url(f"{daemon_url}/openapi.json")
    seen: dict[str, list[int]] = {}
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def run(case):
            response = case.call_and_validate(base_url=daemon_url, excluded_checks=[positive_data_acceptance])
            seen.setdefault(op.label, []).append(response.status_code)
            assert response.status_code < 500

        run()
    assert REQUIRED_OPERATIONS <= set(seen)
    statuses = {code for codes in seen.values() for code in codes}
    assert 200 in statuses and max(statuses) < 500
    assert sum(len(c) for c in seen.values()) >= len(seen) * 5  # really generated cases


def test_spec_covers_every_endpoint_and_only_reads(daemon_url):
    with urllib.request.urlopen(f"{daemon_url}/openapi.json", timeout=10) as r:
        spec = json.load(r)
    ops = {f"{m.upper()} {p}" for p, item in spec["paths"].items() for m in item}
    assert REQUIRED_OPERATIONS <= ops
    assert {o.split()[0] for o in ops} == {"GET"}
    # The JSON answers are declared with their schemas, not as "any".
    assert "ReportBody" in json.dumps(spec["paths"]["/diagnose"]["get"]["responses"]["200"])
    assert "ProbesBody" in json.dumps(spec["paths"]["/probes"]["get"]["responses"]["200"])
    assert "400" in spec["paths"]["/diagnose"]["get"]["responses"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/", "/metrics", "/diagnose", "/probes", "/healthz", "/readyz"])
def test_no_endpoint_accepts_writes(daemon_url, method, path):
    req = urllib.request.Request(f"{daemon_url}{path}", data=b"{}", method=method)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405
