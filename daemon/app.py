"""The HTTP API (FastAPI): /metrics, /probes, /diagnose, /healthz, /readyz."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dpwatch import __version__
from dpwatch.daemon import apimodels as M
from dpwatch.daemon.collector import make_registry
from dpwatch.daemon.config import ConfigError, parse_duration
from dpwatch.daemon.triage.html import render_html
from dpwatch.daemon.triage import build_report, render_text

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


REPORT_FORMATS = ("text", "json", "html")


def report_format(fmt: str | None, accept: str) -> str:
    """?format= wins; else the Accept header: the first of text/html or application/json it
    lists (browsers ask for text/html first), else text."""
    if fmt is not None and fmt != "":
        if fmt not in REPORT_FORMATS:
            raise BadRequest(f"format: {fmt!r} is not supported; use text, json or html")
        return fmt
    accept = (accept or "").lower()
    found = {name: accept.find(mime) for name, mime in (("html", "text/html"), ("json", "application/json"))}
    found = {k: v for k, v in found.items() if v >= 0}
    return min(found, key=found.get) if found else "text"


def wants_json(fmt: str | None, accept: str) -> bool:
    return report_format(fmt, accept) == "json"


def create_app(daemon, web=None, status=None) -> FastAPI:
    """``status``: a callable whose dict joins the /probes body (`dpwatch run` gives the
    notrack table's and the unix socket's)."""
    # No /docs or /redoc (they load scripts from a CDN); the spec itself is at /openapi.json.
    app = FastAPI(title="dpwatch", version=__version__, docs_url=None, redoc_url=None,
                  description="Per-node eBPF datapath observer: metrics, probe status and a triage report.")
    registry = make_registry(daemon.manager, daemon.features)
    _secure(app, daemon.config, web)
    _error_handlers(app)
    _liveness_routes(app, daemon)

    @app.get("/metrics", response_class=Response, responses={200: {"content": M.PROM_TEXT}, **M.GUARDED})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/probes", response_model=None, responses={200: {"model": M.ProbesBody}, **M.GUARDED})
    def probes() -> dict[str, Any]:
        body = {"kernel": daemon.features.kernel_release,
                "features": daemon.features.summary(),
                "compile_seconds": round(daemon.manager.compile_seconds, 3),
                "probes": daemon.manager.statuses()}
        if status is not None:
            body.update(status())
        return body

    @app.get("/diagnose", responses={200: {"model": M.ReportBody, "content": M.TEXT}, **M.BAD_PARAM,
                                     **M.GUARDED})
    def diagnose(request: Request, window: str | None = None, format: str | None = None):
        fmt = report_format(format, request.headers.get("accept", ""))
        seconds = parse_window(window, daemon.config.default_window, daemon.config.max_window)
        report = build_report(daemon.manager, daemon.ring, seconds, daemon.features)
        if fmt == "json":
            return JSONResponse(report)
        if fmt == "html":
            return HTMLResponse(render_html(report))
        return PlainTextResponse(render_text(report))

    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"error": message}: a bad parameter a 400 that says what is wrong."""
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


def _liveness_routes(app: FastAPI, daemon) -> None:
    @app.get("/", response_class=PlainTextResponse, responses=M.GUARDED)
    def index() -> str:
        return ("dpwatch " + __version__ + "\n"
                "  /metrics    Prometheus metrics\n"
                "  /diagnose   triage report (?window=60s, ?format=json|text)\n"
                "  /probes     probe states, modes and reasons (JSON)\n"
                "  /healthz    process is alive\n"
                "  /readyz     probes are loaded\n")

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok\n"

    @app.get("/readyz", response_class=PlainTextResponse,
             responses={200: {"content": M.TEXT}, 503: {"content": M.TEXT, "description": "not ready"},
                        **{k: v for k, v in M.GUARDED.items() if k != 503}})
    def readyz() -> Response:
        if daemon.ready:
            return PlainTextResponse("ready\n")
        return PlainTextResponse("not ready: no probe is attached\n", status_code=503)


def _secure(app: FastAPI, config, web) -> None:
    """The web config (basic auth, headers), the /diagnose and /probes restriction and the
    concurrency limit, as one ASGI middleware (daemon/httpsec.py). TLS is the server's part."""
    from dpwatch.daemon.httpsec import SecurityMiddleware, load_web_config
    path = getattr(config, "web_config_file", "")
    if web is None and path:
        web = load_web_config(path)
    app.add_middleware(SecurityMiddleware, web=web,
                       max_concurrent=int(getattr(config, "max_concurrent_requests", 0) or 0),
                       restrict_loopback=getattr(config, "restrict_diagnose", "off") == "loopback",
                       token=getattr(config, "diagnose_token", "") or "")
