"""The HTTP API (FastAPI): /metrics, /probes, /diagnose, /healthz, /readyz."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .collector import make_registry
from .config import ConfigError, parse_duration
from .triage import build_report, render_text

MIN_WINDOW_SECONDS = 1.0


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def parse_window(value: str | None, default: float, maximum: float) -> float:
    if value is None or value == "":
        return default
    try:
        seconds = parse_duration(value, "window")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    if seconds < MIN_WINDOW_SECONDS:
        raise BadRequest(f"window: {value!r} is shorter than the minimum of {MIN_WINDOW_SECONDS:g}s")
    if seconds > maximum:
        raise BadRequest(f"window: {value!r} is longer than the {maximum:g}s of history this daemon "
                         "keeps (see --max-window)")
    return seconds


def wants_json(fmt: str | None, accept: str) -> bool:
    if fmt is not None and fmt != "":
        if fmt not in ("text", "json"):
            raise BadRequest(f"format: {fmt!r} is not supported; use text or json")
        return fmt == "json"
    return "application/json" in (accept or "")


def create_app(daemon) -> FastAPI:
    app = FastAPI(title="dpwatch", version=__version__,
                  description="Per-node eBPF datapath observer: metrics, probe status and a triage report.")
    registry = make_registry(daemon.manager, daemon.features)

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, exc: BadRequest):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": msgs or "invalid request"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.get("/", response_class=PlainTextResponse)
    def index() -> str:
        return ("dpwatch " + __version__ + "\n"
                "  /metrics    Prometheus metrics\n"
                "  /diagnose   triage report (?window=60s, ?format=json|text)\n"
                "  /probes     probe states, modes and reasons (JSON)\n"
                "  /healthz    process is alive\n"
                "  /readyz     probes are loaded\n")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/probes")
    def probes() -> dict[str, Any]:
        return {"kernel": daemon.features.kernel_release,
                "features": daemon.features.summary(),
                "compile_seconds": round(daemon.manager.compile_seconds, 3),
                "probes": daemon.manager.statuses()}

    @app.get("/diagnose")
    def diagnose(request: Request, window: str | None = None, format: str | None = None):
        as_json = wants_json(format, request.headers.get("accept", ""))
        seconds = parse_window(window, daemon.config.default_window, daemon.config.max_window)
        report = build_report(daemon.manager, daemon.ring, seconds, daemon.features)
        if as_json:
            return JSONResponse(report)
        return PlainTextResponse(render_text(report))

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok\n"

    @app.get("/readyz")
    def readyz() -> Response:
        if daemon.ready:
            return PlainTextResponse("ready\n")
        return PlainTextResponse("not ready: no probe is attached\n", status_code=503)

    return app
