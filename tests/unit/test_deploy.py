"""deploy/ and the Dockerfile, checked with the real tools installed by deploy/setup.sh --test:
kubernetes-validate (offline schemas), promtool (check rules, test rules) and hadolint.

kubernetes-validate ships no schemas for CRD kinds (ServiceMonitor, PodMonitor, PrometheusRule)
or for Kustomization: those are checked structurally here instead (the fields the Prometheus
Operator and kustomize read), and the test asserts the validator really has no schema for them,
so a validator that learns them is noticed.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "alerts" / "dpwatch.rules.yml"
RULE_TESTS = DEPLOY / "alerts" / "dpwatch.rules.test.yml"
BIN = pathlib.Path(sys.executable).parent
sys.path.insert(0, str(DEPLOY / "alerts"))

ALERTS = ["DpwatchConntrackTableNearlyFull", "DpwatchConntrackDrops", "DpwatchPacketDropsHigh",
          "DpwatchMTUMismatch", "DpwatchFragmentationActive", "DpwatchDNSLatencyHigh", "DpwatchDNSTimeouts",
          "DpwatchDNSErrors", "DpwatchSoftnetDrops", "DpwatchProbeDown", "DpwatchDown"]
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Kustomization"}
CAPS = {"BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_RESOURCE", "SYSLOG"}


def docs(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[pathlib.Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def by_kind() -> dict[str, dict]:
    out = {}
    for p in manifests():
        for d in docs(p):
            out[d["kind"]] = d
    return out


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert path, f"{name} missing: run deploy/setup.sh --test"
    return str(path)


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# -- kubernetes-validate ----------------------------------------------------------------------
def k8s_versions() -> list[str]:
    import kubernetes_validate
    return ["1.30.0", kubernetes_validate.latest_version()]


@pytest.mark.parametrize("version", k8s_versions())
def test_manifests_pass_kubernetes_validate_strict(version):
    files = [str(p) for p in manifests()]
    res = run(tool("kubernetes-validate"), "--strict", "-k", version, *files)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    validated = set(re.findall(r"INFO (\S+) passed for resource", out))
    no_schema = set(re.findall(r"Couldn't find schema for kind (\w+)", out))
    assert no_schema == CRD_KINDS, out  # what it cannot validate is exactly the CRD/kustomize kinds
    kinds = {d["kind"]: p.name for p in manifests() for d in docs(p)}
    assert {p for k, p in kinds.items() if k not in CRD_KINDS} == {pathlib.Path(f).name for f in validated}
    assert {"Namespace", "ServiceAccount", "DaemonSet", "Service"} <= set(kinds)


def test_kubernetes_validate_rejects_a_misspelt_field(tmp_path):
    bad = tmp_path / "daemonset.yaml"
    bad.write_text((DEPLOY / "daemonset.yaml").read_text().replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:"))
    res = run(tool("kubernetes-validate"), "--strict", "-k", "1.30.0", str(bad))
    assert res.returncode != 0 and "readOnlyRootFileSystem" in res.stdout + res.stderr


# -- the DaemonSet ----------------------------------------------------------------------------
def container() -> dict:
    return by_kind()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]


def test_daemonset_security():
    spec = by_kind()["DaemonSet"]["spec"]["template"]["spec"]
    c = container()
    sc = c["securityContext"]
    assert spec["hostNetwork"] is True and "hostPID" not in spec
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPS and len(sc["capabilities"]["add"]) == len(CAPS)
    # no flag that would need SYS_ADMIN (setns into pod netns)
    assert not any("all-netns" in a for a in c.get("args", []))
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == "dpwatch"


def test_every_added_capability_is_justified_in_a_comment():
    lines = (DEPLOY / "daemonset.yaml").read_text().splitlines()
    for cap in CAPS:
        i = next(i for i, ln in enumerate(lines) if ln.strip() == f"- {cap}")
        comment = []
        j = i - 1
        while lines[j].strip().startswith("#"):
            comment.insert(0, lines[j].strip("# ").strip())
            j -= 1
        assert len(" ".join(comment)) >= 30, f"{cap}: no justification comment above it"
    text = "\n".join(lines)
    assert "SYS_ADMIN" in text and "--conntrack-all-netns" in text and "--mtu-all-netns" in text


def test_daemonset_mounts_probes_and_env():
    c = container()
    spec = by_kind()["DaemonSet"]["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug", "/lib/modules", "/usr/src"):
        assert mounts[path]["readOnly"] is True, path
        assert vols[mounts[path]["name"]]["hostPath"]["path"] == path
    assert "emptyDir" in vols[mounts["/tmp"]["name"]] and not mounts["/tmp"].get("readOnly")
    # The unix socket's directory, from the host, so a shell on the node finds the socket
    # (the daemon's default --unix-socket /run/dpwatch/dpwatch.sock).
    from dpwatch.daemon.config import DEFAULT_UNIX_SOCKET
    run = mounts["/run/dpwatch"]
    assert DEFAULT_UNIX_SOCKET.startswith("/run/dpwatch/") and not run.get("readOnly")
    assert vols[run["name"]]["hostPath"] == {"path": "/run/dpwatch", "type": "DirectoryOrCreate"}
    # The pods' netns files, for naming the pod end of a veth: read-only, new pods propagated.
    ns = mounts["/run/netns"]
    assert ns["readOnly"] is True and ns["mountPropagation"] == "HostToContainer"
    assert vols[ns["name"]]["hostPath"]["path"] == "/run/netns"
    # every other mount is read-only
    assert all(m.get("readOnly") for p, m in mounts.items() if p not in ("/tmp", "/run/dpwatch"))
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert c["args"] == ["--listen", "0.0.0.0:9400"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def mib(q: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", q)
    assert m, q
    return int(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


def test_resources_follow_the_benchmark():
    """Requests and limits come from BENCHMARKS.md: the memory request covers steady RSS
    (anon + file), the limit at least twice the start-up peak; the figures the manifest cites
    are the benchmark's."""
    bench = (REPO / "BENCHMARKS.md").read_text()
    peak = float(re.search(r"peak RSS \(VmHWM\) \| ([\d.]+) MiB", bench).group(1))
    anon, file_ = map(float, re.search(r"steady RSS after \d+ s \(RssAnon / RssFile / RssShmem\) \| "
                                       r"([\d.]+) / ([\d.]+)", bench).groups())
    idle = float(re.search(r"\| idle CPU \| ([\d.]+) CPU-s/min", bench).group(1))
    # the soaks with every probe: the largest end RSS (MiB) of their table
    soak_end = max(float(x) for x in re.findall(r"^\| \d[^|]*\| all 7[^|]*\| [^|]+\| [\d.]+ \| [\d.]+ \| [\d.]+ \| "
                                                r"([\d.]+) \|", bench, re.M))
    res = container()["resources"]
    assert mib(res["requests"]["memory"]) >= max(anon + file_, soak_end)
    assert mib(res["limits"]["memory"]) >= 2 * peak
    idle_millicores = idle / 60 * 1000
    assert 5 * idle_millicores <= int(res["requests"]["cpu"].rstrip("m")) <= 100
    text = (DEPLOY / "daemonset.yaml").read_text()
    for cited in re.findall(r"(\d+\.\d+) (?:MiB|CPU-s/min|s of)", text):
        assert cited in bench, f"daemonset.yaml cites {cited}, which BENCHMARKS.md does not have"


# -- Service, monitors, kustomization ----------------------------------------------------------
def test_service_and_monitors_select_the_daemonset():
    k = by_kind()
    pod_labels = k["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    svc = k["Service"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9400, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    sm, pm = k["ServiceMonitor"], k["PodMonitor"]
    for mon, eps, target in ((sm, "endpoints", svc["metadata"]["labels"]), (pm, "podMetricsEndpoints", pod_labels)):
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert mon["metadata"]["namespace"] == "dpwatch"
        assert mon["spec"]["selector"]["matchLabels"].items() <= target.items()
        assert mon["spec"]["namespaceSelector"]["matchNames"] == ["dpwatch"]
        # job "dpwatch" (what the alerts select), instance = node name (what the dashboards list)
        assert pod_labels[mon["spec"]["jobLabel"]] == "dpwatch"
        (ep,) = mon["spec"][eps]
        assert ep["port"] == "metrics" and ep["path"] == "/metrics"
        relabel = {r["targetLabel"]: r["sourceLabels"] for r in ep["relabelings"]}
        assert relabel["instance"] == ["__meta_kubernetes_pod_node_name"]
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}


def test_kustomization_lists_the_manifests():
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    resources = kust["resources"]
    assert all((DEPLOY / r).exists() for r in resources)
    # everything but the PodMonitor alternative (one of the two monitors, never both)
    want = {p.name for p in manifests()} - {"kustomization.yaml", "podmonitor.yaml"}
    assert set(resources) == want
    for p in manifests():
        for d in docs(p):
            if d["kind"] not in ("Namespace", "Kustomization"):
                assert d["metadata"]["namespace"] == "dpwatch", p.name


# -- alert rules --------------------------------------------------------------------------------
def rules() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def test_promtool_check_rules():
    res = run(tool("promtool"), "check", "rules", str(RULES))
    assert res.returncode == 0 and f"SUCCESS: {len(ALERTS)} rules found" in res.stdout, res.stdout + res.stderr


def test_promtool_unit_tests_pass():
    res = run(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """A rule whose threshold drifts makes its unit test fail: the tests pin behaviour."""
    (tmp_path / "dpwatch.rules.yml").write_text(RULES.read_text().replace("> 50", "> 500"))
    (tmp_path / "t.yml").write_text(RULE_TESTS.read_text())
    res = run(tool("promtool"), "test", "rules", str(tmp_path / "t.yml"))
    assert res.returncode != 0 and "DpwatchPacketDropsHigh" in res.stdout + res.stderr


def test_every_alert_has_labels_annotations_and_tests():
    r = rules()
    assert sorted(r) == sorted(ALERTS)
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for name, rule in r.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        ann = rule["annotations"]
        assert ann["summary"] and len(ann["description"]) > 80 and ann["runbook_url"].startswith("https://"), name
        assert "{{ $labels.instance }}" in ann["summary"], name
        cases = [c for t in tests for c in t["alert_rule_test"] if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases), f"{name}: no firing case"
        assert any(not c["exp_alerts"] for c in cases), f"{name}: no quiet case"
        # ...and the firing case has a quiet node next to the firing one in the same data
        firing = [c for c in cases if c["exp_alerts"]]
        fired = {a["exp_labels"]["instance"] for c in firing for a in c["exp_alerts"]}
        series = [s["series"] for t in tests if any(c["alertname"] == name for c in t["alert_rule_test"])
                  for s in t["input_series"]]
        present = set(re.findall(r'instance="([^"]+)"', " ".join(series)))
        assert present - fired, f"{name}: no healthy node in its test data"


def finding_ids() -> set[str]:
    sys.path.insert(0, str(REPO))
    from dpwatch.probes.registry import PROBES
    return {fid for p in PROBES for fid in getattr(p, "finding_ids", ())}


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_runbooks_point_at_findings_and_readme():
    """Finding alerts point at docs/findings.md#<finding id with '.' as '-'>, the id is one a
    probe declares (probes' finding_ids) and the doc has that anchor; the two availability alerts point at README sections
    that exist. The base URL is the image's org.opencontainers.image.source."""
    source = re.search(r'org\.opencontainers\.image\.source="([^"]+)"', (REPO / "Dockerfile").read_text()).group(1)
    base = source + "/blob/main/"
    readme_anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", (REPO / "README.md").read_text(), re.M)}
    declared = finding_ids()
    findings_doc = (REPO / "docs" / "findings.md").read_text()
    unknown = []
    for name, rule in rules().items():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(base), (name, url)
        path, _, anchor = url[len(base):].partition("#")
        if path == "docs/findings.md":
            fid = anchor.replace("-", ".", 1)
            assert anchor == fid.replace(".", "-") and "." in fid
            if fid not in declared:
                unknown.append(f"{name} -> {fid}")
            assert f'<a id="{anchor}"></a>' in findings_doc, f"{name}: docs/findings.md has no anchor {anchor}"
        else:
            assert path == "README.md" and anchor in readme_anchors, (name, url)
    assert not unknown, f"runbooks name finding ids no probe declares: {unknown}"


def test_prometheusrule_carries_the_rules_file():
    import to_prometheusrule
    pr = by_kind()["PrometheusRule"]
    assert pr["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert (DEPLOY / "prometheusrule.yaml").read_text() == to_prometheusrule.render(RULES.read_text()), \
        "deploy/prometheusrule.yaml is stale: run .venv/bin/python deploy/alerts/to_prometheusrule.py"


# -- Dockerfile -------------------------------------------------------------------------------
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for ln in text.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            word, _, rest = ln.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_clean():
    res = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nCMD dpwatch run\n")
    res = run(tool("hadolint"), "--no-color", str(bad))
    assert res.returncode != 0 and "DL3008" in res.stdout and "DL3025" in res.stdout


def test_image_uses_the_one_setup_script():
    """The image installs through deploy/setup.sh (what the README and `make run` use), and
    through nothing else: no apt-get install or pip install of its own."""
    ins = instructions()
    runs = [rest for word, rest in ins if word == "RUN"]
    assert len(runs) == 1
    cmds = [shlex.split(c) for c in runs[0].split("&&")]
    assert cmds[0][:2] == ["bash", "deploy/setup.sh"]
    assert not re.search(r"apt-get install|apt install|pip install|npm ", runs[0])
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "deploy/setup.sh" in readme
    assert re.search(r"^setup:\n\tbash deploy/setup.sh$", makefile, re.M)
    # setup.sh is what installs Debian's BCC
    assert "python3-bpfcc" in (DEPLOY / "setup.sh").read_text()
    # the venv the entrypoint runs is the one setup.sh makes under the WORKDIR
    workdir = next(rest for word, rest in ins if word == "WORKDIR")
    entry = next(rest for word, rest in ins if word == "ENTRYPOINT")
    assert yaml.safe_load(entry) == [f"{workdir}/.venv/bin/dpwatch", "run"]


def test_dockerfile_base_labels_healthcheck():
    ins = instructions()
    assert ins[0][0] == "FROM" and re.fullmatch(r"debian:12(-slim)?", ins[0][1])
    labels = " ".join(rest for word, rest in ins if word == "LABEL")
    for key in ("title", "description", "licenses", "source", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    hc = next(rest for word, rest in ins if word == "HEALTHCHECK")
    assert "/healthz" in hc and "CMD [" in hc
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "**/node_modules"} <= set(ignore)
