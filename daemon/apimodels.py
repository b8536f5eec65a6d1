"""Response schemas of the HTTP API, for its OpenAPI spec (/openapi.json).

The routes return their JSON as before; these models only declare the shape, and the
schemathesis test (tests/e2e/test_schemathesis_e2e.py) holds every real response to it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: str


class ProbeState(BaseModel):
    name: str
    state: Literal["attached", "degraded", "unsupported", "failed", "disabled"]
    mode: str | None
    reason: str
    hooks: list[str]
    required: bool
    description: str
    info: dict[str, Any] | None = None
    diagnose_error: str | None = None
    map_update_errors: dict[str, int] | None = None  # attached probes: failed in-kernel updates by map
    events_lost: dict[str, int] | None = None        # attached probes: lost events by stage


class NotrackState(BaseModel):
    """The nftables table that keeps the listen port out of conntrack (daemon/notrack.py)."""
    state: Literal["active", "off", "failed", "not started"]
    table: str
    port: int
    owner: bool
    rules: list[str]
    reason: str


class UnixSocketState(BaseModel):
    """The API's unix socket (daemon/unixsock.py)."""
    state: Literal["listening", "off", "failed", "not started"]
    path: str
    reason: str


class ProbesBody(BaseModel):
    kernel: str
    features: dict[str, Any]
    compile_seconds: float
    probes: list[ProbeState]
    notrack: NotrackState | None = None          # `dpwatch run` only
    unix_socket: UnixSocketState | None = None   # `dpwatch run` only


class FindingBody(BaseModel):
    id: str
    probe: str
    severity: Literal["info", "warning", "critical"]
    title: str
    summary: str
    evidence: dict[str, Any]
    remediation: list[str]
    impact: float


class ReportBody(BaseModel):
    node: str
    kernel: str
    generated_at: str
    window_seconds: float
    window_requested_seconds: float
    status: Literal["ok", "warning", "critical"]
    findings: list[FindingBody]
    probes: list[ProbeState]


TEXT = {"text/plain": {"schema": {"type": "string"}}}
PROM_TEXT = {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}

# Answers the security middleware may give on any route (daemon/httpsec.py).
GUARDED = {
    401: {"model": ErrorBody, "description": "basic auth or the /diagnose token is missing or wrong"},
    403: {"model": ErrorBody, "description": "restricted to loopback clients"},
    503: {"model": ErrorBody, "description": "too many concurrent requests"},
}
BAD_PARAM = {400: {"model": ErrorBody, "description": "a bad query parameter, named in the error"}}
