"""End-to-end tier for the triage report: the real daemon, faults combined for real, and the
report's root cause on top with nothing reported twice.

- A full conntrack table (nf_conntrack_max 64, held TCP connections) plus DNS queries to a
  real dnsmasq that the full table drops: conntrack.table_full on top, with the
  NETFILTER_DROP drops and the DNS timeouts folded into it.
- An MTU mismatch (a veth pair 1400/1500 behind a router) plus the fragmentation it causes:
  mtu.mismatch on top, with frag.fragmentation_active folded into it.
- A quiet node: all clear, nothing above info.
- The HTML view in headless Debian chromium (Accept: text/html from a real browser): the
  screenshot is not blank and the rendered DOM holds the findings.
- `dpwatch diagnose --url` against the running daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import zlib

import pytest

from dnslab import Dnsmasq, query
from netlab import Lab, in_netns, sh, socket_in
from test_daemon_e2e import NFT_RULES, DaemonProc

PORT = 9460
SEV = {"info": 0, "warning": 1, "critical": 2}
# Findings of host-wide drop reasons this scenario does not cause (see the test).
HOST_WIDE_NOISE = {"drops.socket_receive_buffer", "drops.listen_overflow", "drops.top_reasons"}


def report(d: DaemonProc, window: str = "60s") -> dict:
    status, _, body = d.get(f"/diagnose?format=json&window={window}")
    assert status == 200, body
    return json.loads(body)


def unique_ids(rep: dict) -> list[str]:
    found = [f["id"] for f in rep["findings"]]
    assert len(found) == len(set(found)), f"a finding is reported twice: {found}"
    return found


def test_conntrack_fill_with_dns_timeouts(dpwatch_bin):
    from test_conntrack_kernel import Holder, open_connections  # the kernel tier's helpers
    ct_max = "/proc/sys/net/netfilter/nf_conntrack_max"
    with Lab(pods=1) as lab:
        sh("nft", "-f", "-", ns=lab.node, input=NFT_RULES)
        server = Dnsmasq(lab.node, [lab.pod.node_ip4])
        d = DaemonProc(dpwatch_bin, lab.node, PORT, "--dns-timeout", "1s",
                       "--probes", "drops,conntrack,dns,node")
        with open(ct_max) as fh:
            old = fh.read().strip()
        holder = None
        try:
            d.wait_ready()
            assert query(lab.pod.ns, lab.pod.node_ip4, "ok.test") == "NOERROR"  # DNS works first
            sh("conntrack", "-F", ns=lab.node, check=False)
            holder = Holder(lab.node, lab.pod.node_ip4)
            with open(ct_max, "w") as fh:
                fh.write("64")
            conns, refused = open_connections(lab.pod.ns, lab.pod.node_ip4, holder.port, 100)
            answers = [query(lab.pod.ns, lab.pod.node_ip4, f"n{i}.ok.test", timeout=0.3) for i in range(10)]
            time.sleep(2.5)  # past --dns-timeout, and a sweep
            rep = report(d, "30s")
            text = d.get("/diagnose?window=30s")[2]
        finally:
            with open(ct_max, "w") as fh:
                fh.write(old)
            if holder is not None:
                holder.close()
            d.stop()
            server.close()
    assert (len(conns), refused) == (64, 36)
    assert answers == [None] * 10  # every query dropped by the full table
    found = unique_ids(rep)
    # The drops probe counts every netns: drops of other tests running at the same time on
    # this machine (never in CI, where tests run one by one) are left out of the ranking check.
    mine = [f for f in rep["findings"] if f["id"] not in HOST_WIDE_NOISE]
    top = mine[0]
    assert top["id"] == "conntrack.table_full", found
    assert rep["status"] == "critical"
    assert "drops.netfilter" not in found and "dns.timeouts" not in found
    related = top["evidence"]["related"]
    # Every NETFILTER_DROP in the window is a conntrack drop (SYN retransmits of the refused
    # connects and the DNS queries count in both).
    assert related["drops.netfilter"]["drops"] == related["drops.netfilter"]["explained_by_conntrack"]
    assert related["drops.netfilter"]["drops"] <= top["evidence"]["drops"]
    assert top["evidence"]["drops"] >= refused + 10
    assert related["dns.timeouts"]["timeouts"] == 10
    assert "node.conntrack_max_low" not in found  # folded too when the audit raised it
    assert text.count("(conntrack.table_full)") == 1 and "also explains" in text


def _router_with_mismatch(lab: Lab) -> None:
    """A (pod0) --1500-- R (node) --1400|1500-- B (pod1): R's end of B's veth is 1400, B's end
    1500 (a veth pair with unequal ends), so R fragments what it forwards to B."""
    a, b = lab.pod_list
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.node)
    sh("ip", "link", "set", "dev", b.veth_node, "mtu", "1400", ns=lab.node)
    sh("ip", "route", "add", "default", "via", a.node_ip4, ns=a.ns)
    sh("ip", "route", "add", "default", "via", b.node_ip4, ns=b.ns)


def _send_unfragmented_df_off(ns: str, dst: str, size: int, count: int) -> int:
    s = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: no DF
    try:
        for _ in range(count):
            s.sendto(b"f" * size, (dst, 9))
    finally:
        s.close()
    return count


@pytest.fixture(scope="module")
def mtu_daemon(dpwatch_bin):
    with Lab(pods=2) as lab:
        _router_with_mismatch(lab)
        # Only netns-scoped probes: the ranking below is then the whole report's, even while
        # other tests drop packets elsewhere on this machine.
        d = DaemonProc(dpwatch_bin, lab.node, PORT + 1, "--mtu-all-netns", "--probes", "frag,mtu,node")
        try:
            d.wait_ready()
            yield lab, d
        finally:
            d.stop()


def test_mtu_mismatch_with_fragmentation(mtu_daemon):
    lab, d = mtu_daemon
    a, b = lab.pod_list
    _send_unfragmented_df_off(a.ns, b.ip4, 1472, 20)
    time.sleep(0.5)
    rep = report(d)
    found = unique_ids(rep)
    top = rep["findings"][0]
    assert top["id"] == "mtu.mismatch", found
    assert any(m["kind"] == "veth_mismatch" for m in top["evidence"]["mismatches"])
    assert "frag.fragmentation_active" not in found
    frag = top["evidence"]["related"]["frag.fragmentation_active"]
    assert frag["fragments_created"]["ipv4"] == 40  # 20 datagrams of 1500 B, two fragments each
    assert top["impact"] >= frag["fragments_created_per_second"]


@pytest.mark.host_only  # rendering, not kernel behaviour: host only
def test_html_renders_in_headless_chromium(mtu_daemon, tmp_path):
    lab, d = mtu_daemon
    browser = shutil.which("chromium")
    assert browser, "chromium missing: run deploy/setup.sh --test"
    url = f"http://127.0.0.1:{d.port}/diagnose?window=60s"  # no format: chromium's Accept asks for HTML
    status, headers, page = d.get("/diagnose?window=60s", {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "<script" not in page and "http://" not in page.replace(url, "") and "https://" not in page
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,1400"]
    shot = tmp_path / "diagnose.png"
    res = subprocess.run(["ip", "netns", "exec", lab.node, browser, *flags, f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert shot.exists(), res.stderr[-2000:]
    dom = subprocess.run(["ip", "netns", "exec", lab.node, browser, *flags, "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'id="mtu-mismatch"' in dom and "Likeliest cause:" in dom
    assert "MTU mismatch" in dom and "<svg" in dom
    width, height, pixels = read_png(shot.read_bytes())
    assert (width, height) == (1100, 1400)
    lum = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in pixels]
    mean = sum(lum) / len(lum)
    variance = sum((x - mean) ** 2 for x in lum) / len(lum)
    colours = len(set(pixels))
    assert variance > 50 and colours > 20, (variance, colours)  # text and charts, not a blank page
    # The severity colour of the critical finding is on screen (#b42318).
    assert sum(1 for p in pixels if p == (0xb4, 0x23, 0x18)) > 100
    keep = os.environ.get("DPWATCH_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


@pytest.mark.host_only  # HTTP client behaviour: host only
def test_diagnose_url_against_the_daemon(mtu_daemon, dpwatch_bin):
    lab, d = mtu_daemon
    res = subprocess.run(["ip", "netns", "exec", lab.node, dpwatch_bin, "diagnose", "--url",
                          f"http://127.0.0.1:{d.port}", "--window", "60s"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr  # critical
    lines = res.stdout.splitlines()
    assert lines[2].startswith("STATUS: CRITICAL")
    first = next(line for line in lines if line.startswith("1. "))  # after the short-window note
    assert first.startswith("1. [CRITICAL] MTU mismatch") and first.endswith("(mtu.mismatch)")
    res = subprocess.run(["ip", "netns", "exec", lab.node, dpwatch_bin, "diagnose", "--url",
                          f"http://127.0.0.1:{d.port + 50}"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 69 and "cannot reach the daemon" in res.stderr


def test_quiet_node_is_all_clear(dpwatch_bin):
    """Nothing above info on a quiet node. drops and softirq are left out: they count host-wide
    (every netns), so other tests' traffic on this machine would land in their window."""
    with Lab(pods=1) as lab:
        d = DaemonProc(dpwatch_bin, lab.node, PORT + 2, "--probes", "conntrack,frag,mtu,dns,node")
        try:
            d.wait_ready()
            time.sleep(2)
            rep = report(d)
            text = d.get("/diagnose")[2]
        finally:
            d.stop()
    assert rep["status"] == "ok", [(f["id"], f["severity"]) for f in rep["findings"]]
    assert all(f["severity"] == "info" for f in rep["findings"])
    assert "Nothing abnormal seen in this window." in text.splitlines()
    assert text.splitlines()[2].startswith("STATUS: OK  (")


def read_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """A minimal PNG reader (8-bit RGB or RGBA, no interlace) -> (width, height, RGB pixels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype, _c, _f, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    pixels = []
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels += [tuple(line[i:i + 3]) for i in range(0, stride, bpp)]
        prev = line
    return width, height, pixels
