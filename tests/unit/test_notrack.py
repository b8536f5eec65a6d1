"""Reachable while the conntrack table is full: the notrack table's commands and its failure
handling (daemon/notrack.py), the unix socket (daemon/unixsock.py) served by the real uvicorn
server class of `dpwatch run`, `dpwatch diagnose` over it, and the flags.

The real table in a netns whose conntrack table is full is tests/e2e/test_reachable_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from dpwatch.daemon import cli, notrack
from dpwatch.daemon.apimodels import NotrackState, ProbesBody, UnixSocketState
from dpwatch.daemon.config import DEFAULT_UNIX_SOCKET, Config, ConfigError
from dpwatch.daemon.httpsec import SecurityMiddleware, WebConfig
from dpwatch.daemon.unixsock import UnixHTTPConnection, UnixListener, UnixPeerApp, is_socket

TOKEN = "t0ken-of-sixteen-chars"


# ---- the table's commands ------------------------------------------------------------------------

def test_rules_exempt_the_port_both_ways_and_local_clients():
    got = [(c, r) for c, r, _ in notrack.rules(9400)]
    assert got == [("prerouting", "tcp dport 9400 fib daddr type local notrack"),
                   ("output", "tcp sport 9400 notrack"),
                   ("output", 'oif "lo" tcp dport 9400 notrack')]
    for bad in (0, 65536, -1):
        with pytest.raises(ValueError):
            notrack.rules(bad)


def test_script_is_one_replacing_transaction_at_raw_priority():
    lines = notrack.script(9611).splitlines()
    # A stale table of that name (a daemon killed on a kernel without owner tables) goes first.
    assert lines[:2] == ["add table inet dpwatch", "delete table inet dpwatch"]
    assert lines[2].startswith("add table inet dpwatch { flags owner; comment ")
    assert "add chain inet dpwatch prerouting { type filter hook prerouting priority -300; policy accept; }" in lines
    assert "add chain inet dpwatch output { type filter hook output priority -300; policy accept; }" in lines
    assert notrack.PRIORITY_RAW == -300  # raw: before conntrack's -200
    rules = [ln for ln in lines if ln.startswith("add rule")]
    assert len(rules) == 3 and all("9611" in r and " notrack comment " in r for r in rules)
    assert "flags owner" not in notrack.script(9611, owner=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="libnftables checks a dry run against the kernel's cache: root")
def test_libnftables_accepts_the_script_in_a_dry_run():
    nftables = pytest.importorskip("nftables", reason="Debian python3-nftables (deploy/setup.sh)")
    nft = nftables.Nftables()
    nft.set_dry_run(True)  # parsed and evaluated, nothing committed
    for owner in (True, False):
        rc, _, err = nft.cmd(notrack.script(9400, owner=owner))
        assert rc == 0, err


class FakeNft:
    """libnftables' cmd(): answers in order; records the commands."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.cmds: list[str] = []

    def cmd(self, text):
        self.cmds.append(text)
        return self.answers.pop(0) if self.answers else (0, "", "")


def test_active_owned_table_then_deleted_at_stop():
    fake = FakeNft()
    t = notrack.NotrackTable(9400, factory=lambda: fake).start()
    assert (t.state, t.owner) == ("active", True) and "removes it when dpwatch exits" in t.reason
    assert fake.cmds == [notrack.script(9400, owner=True)]
    st = t.status()
    NotrackState(**st)  # the /probes schema
    assert st["table"] == "inet dpwatch" and st["port"] == 9400 and len(st["rules"]) == 3
    t.stop()
    assert fake.cmds[-1] == "delete table inet dpwatch" and t.state == "off"
    t.stop()  # twice: nothing more
    assert len(fake.cmds) == 2


@pytest.mark.parametrize("err", ["Error: Could not process rule: Operation not supported\n",
                                 "Error: Could not process rule: Invalid argument\n"])
def test_kernel_without_owner_tables_gets_the_plain_table(err):
    fake = FakeNft((1, "", err), (0, "", ""))
    t = notrack.NotrackTable(9400, factory=lambda: fake).start()
    assert (t.state, t.owner) == ("active", False)
    assert fake.cmds == [notrack.script(9400, owner=True), notrack.script(9400, owner=False)]
    assert "replaced at the next start" in t.reason


def test_failures_are_reported_never_raised(monkeypatch, caplog):
    perm = (1, "", "Error: Could not process rule: Operation not permitted\nadd table inet dpwatch\n")
    monkeypatch.setattr(notrack, "has_cap", lambda bit: False)
    t = notrack.NotrackTable(9400, factory=lambda: FakeNft(perm)).start()
    assert t.state == "failed" and t.reason.startswith("needs CAP_NET_ADMIN")
    assert "cannot keep TCP port 9400 out of conntrack" in caplog.text
    monkeypatch.setattr(notrack, "has_cap", lambda bit: True)
    t = notrack.NotrackTable(9400, factory=lambda: FakeNft(perm)).start()
    assert t.state == "failed" and "another running process" in t.reason
    t = notrack.NotrackTable(9400, factory=lambda: FakeNft((1, "", "Error: No such file or directory"))).start()
    assert t.state == "failed" and "No such file" in t.reason

    def missing():
        raise ImportError("No module named 'nftables'")
    t = notrack.NotrackTable(9400, factory=missing).start()
    assert t.state == "failed" and "python3-nftables" in t.reason
    NotrackState(**t.status())
    t.stop()  # nothing to delete

    class Broken(FakeNft):
        def cmd(self, text):
            if text.startswith("delete table inet dpwatch") and len(self.cmds) > 0:
                raise OSError("netlink gone")
            return super().cmd(text)
    t = notrack.NotrackTable(9400, factory=Broken).start()
    t.stop()  # logged, not raised
    assert t.state == "off"


def test_turned_off():
    called = []
    t = notrack.NotrackTable(9400, enabled=False, factory=lambda: called.append(1)).start()
    assert called == [] and t.state == "off" and "--no-notrack" in t.reason
    NotrackState(**t.status())


def test_has_cap_reads_capeff(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")  # bit 12: CAP_NET_ADMIN
    assert notrack.has_cap(12, str(status)) and not notrack.has_cap(21, str(status))
    assert not notrack.has_cap(12, str(tmp_path / "missing"))


# ---- flags --------------------------------------------------------------------------------------

def run_cfg(*argv):
    return cli.config_from_args(cli.build_parser().parse_args(["run", *argv]))


def test_defaults_and_flags(monkeypatch):
    for var in ("DPWATCH_NOTRACK", "DPWATCH_UNIX_SOCKET"):
        monkeypatch.delenv(var, raising=False)
    cfg = run_cfg()
    assert cfg.notrack is True and cfg.unix_socket == DEFAULT_UNIX_SOCKET == "/run/dpwatch/dpwatch.sock"
    assert run_cfg("--no-notrack").notrack is False
    assert run_cfg("--unix-socket", "").unix_socket == ""
    assert run_cfg("--unix-socket", "/tmp/x.sock").unix_socket == "/tmp/x.sock"
    monkeypatch.setenv("DPWATCH_NOTRACK", "0")
    monkeypatch.setenv("DPWATCH_UNIX_SOCKET", "")
    cfg = run_cfg()
    assert cfg.notrack is False and cfg.unix_socket == ""
    assert run_cfg("--notrack").notrack is True  # the flag wins
    monkeypatch.setenv("DPWATCH_UNIX_SOCKET", "/tmp/env.sock")
    args = cli.build_parser().parse_args(["diagnose", "--socket", "/tmp/y.sock"])
    assert cli.config_from_args(args).unix_socket == "/tmp/y.sock"
    args = cli.build_parser().parse_args(["diagnose"])
    assert cli.config_from_args(args).unix_socket == "/tmp/env.sock"


@pytest.mark.parametrize("argv, needle", [
    (["run", "--unix-socket", "relative.sock"], "not an absolute path"),
    (["run", "--unix-socket", "/" + "x" * 120], "longer than the 107 bytes"),
    (["diagnose", "--socket", "/run/dpwatch/"], "names a directory"),
])
def test_bad_socket_paths_exit_64(capsys, argv, needle):
    assert cli.main(argv) == 64
    assert needle in capsys.readouterr().err


def test_bad_notrack_variable_exits_64(monkeypatch, capsys):
    monkeypatch.setenv("DPWATCH_NOTRACK", "maybe")
    assert cli.main(["run"]) == 64
    assert "DPWATCH_NOTRACK" in capsys.readouterr().err


def test_config_validates_the_socket_path():
    with pytest.raises(ConfigError):
        Config(unix_socket="x.sock").validate()
    assert Config(unix_socket="").validate().unix_socket == ""


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--help"])
    out = capsys.readouterr().out
    assert "--notrack, --no-notrack" in out and "--unix-socket PATH" in out


# ---- the unix socket ------------------------------------------------------------------------------

def test_listener_binds_0600_and_replaces_only_a_stale_socket(tmp_path):
    path = str(tmp_path / "run" / "dpwatch.sock")
    a = UnixListener(path)
    assert a.open() is not None and a.state == "listening"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and is_socket(path)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    UnixSocketState(**a.status())
    b = UnixListener(path)  # a live socket belongs to its daemon
    assert b.open() is None and b.state == "failed" and "another process" in b.reason
    a.close()
    assert not os.path.exists(path) and a.state == "off"

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a killed daemon's file: nothing listens
    stale.close()
    c = UnixListener(path)
    assert c.open() is not None and c.state == "listening"
    os.unlink(path)
    d = UnixListener(path)  # a later daemon's file is never removed by an older one
    d.open()
    c.close()
    assert is_socket(path)
    d.close()

    with open(path, "w") as fh:
        fh.write("not a socket")
    e = UnixListener(path)
    assert e.open() is None and e.state == "failed" and "not a socket" in e.reason
    assert open(path).read() == "not a socket"
    assert UnixListener("").open() is None and UnixListener("").state == "off"


def test_unix_peer_skips_auth_and_the_restriction():
    async def ok(_request):
        return PlainTextResponse("ok")
    inner = Starlette(routes=[Route(p, ok) for p in ("/metrics", "/diagnose")])
    from test_httpsec import HASH  # a bcrypt hash of "s3cret"
    guarded = SecurityMiddleware(inner, web=WebConfig(users={"prom": HASH.encode()}),
                                 restrict_loopback=True, token=TOKEN)

    async def go(app, path):
        transport = httpx.ASGITransport(app=app, client=("198.18.0.2", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://dpwatch") as c:
            return (await c.get(path)).status_code
    assert asyncio.run(go(guarded, "/diagnose")) == 401
    assert asyncio.run(go(guarded, "/metrics")) == 401
    assert asyncio.run(go(UnixPeerApp(guarded), "/diagnose")) == 200
    assert asyncio.run(go(UnixPeerApp(guarded), "/metrics")) == 200


REPORT = {"node": "n", "kernel": "k", "generated_at": "t", "window_seconds": 5.0,
          "window_requested_seconds": 5.0, "status": "critical",
          "findings": [{"id": "conntrack.table_full", "probe": "conntrack", "severity": "critical",
                        "title": "t", "summary": "s", "evidence": {}, "remediation": [], "impact": 1.0,
                        "score": 3.0}],
          "series": [], "probes": []}


@contextlib.contextmanager
def served(tmp_path, **security):
    """The real server class of `dpwatch run` on 127.0.0.1:0 plus a unix socket, in a thread."""
    seen = []

    async def diagnose(request):
        seen.append((request.url.path, dict(request.query_params), request.client))
        return JSONResponse(REPORT)
    app = SecurityMiddleware(Starlette(routes=[Route("/diagnose", diagnose)]), **security)
    import uvicorn
    base = cli._server_class()

    class Server(base):
        @contextlib.contextmanager
        def capture_signals(self):  # not the main thread
            yield
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                   lifespan="off", log_config=None))
    table = notrack.NotrackTable(0, factory=FakeNft)
    unix = UnixListener(str(tmp_path / "d.sock"))
    server.after_startup = lambda srv: cli.reachable(srv, app, table, unix)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not (server.started and unix.state == "listening") and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield server, table, unix, seen
    finally:
        server.should_exit = True
        thread.join(10)
        unix.close()


def test_run_serves_the_app_on_the_unix_socket_too(tmp_path):
    with served(tmp_path, token=TOKEN) as (server, table, unix, seen):
        port = server.servers[0].sockets[0].getsockname()[1]
        assert table.state == "active" and table.port == port  # the bound port, not 0
        conn = UnixHTTPConnection(unix.path, timeout=5)
        conn.request("GET", "/diagnose?format=json")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "critical"
        conn.close()
        with httpx.Client() as c:  # the TCP port keeps its guard
            assert c.get(f"http://127.0.0.1:{port}/diagnose").status_code == 401
        assert seen[0][2] is None  # a unix peer has no address
    assert server.started and not os.path.exists(unix.path)


def test_diagnose_asks_the_daemon_on_the_socket(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DPWATCH_UNIX_SOCKET", raising=False)
    monkeypatch.setattr(cli, "cmd_diagnose", lambda cfg: pytest.fail("ran a one-shot"))
    with served(tmp_path) as (_server, _table, unix, seen):
        rc = cli.main(["diagnose", "--socket", unix.path, "--format", "json", "--window", "30s"])
        out = capsys.readouterr().out
        assert cli.fetch_report("http://localhost", None, unix_socket=unix.path) == REPORT
    assert rc == 2 and json.loads(out)["findings"][0]["id"] == "conntrack.table_full"
    assert seen[0][:2] == ("/diagnose", {"format": "json", "window": "30s"})
    assert seen[1][:2] == ("/diagnose", {"format": "json"})  # no --window: the daemon's own


def test_diagnose_falls_back_to_one_shot(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "cmd_diagnose", lambda cfg: ran.append(cfg.unix_socket) or 0)
    missing = str(tmp_path / "none.sock")
    assert cli.main(["diagnose", "--socket", missing]) == 0 and ran == [missing]
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)  # a killed daemon's file
    s.close()
    assert cli.main(["diagnose", "--socket", stale]) == 0 and ran[-1] == stale
    assert "no daemon listens on" in capsys.readouterr().err
    with pytest.raises(cli.DaemonAbsent):
        cli.fetch_report("http://localhost", None, unix_socket=stale)
    assert cli.main(["diagnose", "--socket", ""]) == 0 and ran[-1] == ""


def test_probes_schema_takes_the_new_keys():
    body = {"kernel": "k", "features": {}, "compile_seconds": 1.0, "probes": [],
            "notrack": notrack.NotrackTable(9400, enabled=False).status(),
            "unix_socket": UnixListener("").status()}
    assert ProbesBody(**body).notrack.state == "off"
    assert ProbesBody(**{k: v for k, v in body.items() if k not in ("notrack", "unix_socket")}).notrack is None
