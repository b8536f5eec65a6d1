# dpwatch container image: Debian 12, Debian's BCC (python3-bpfcc), and dpwatch in a venv,
# all installed by deploy/setup.sh, the same set-up script the README and `make run` use
# (tests/unit/test_deploy.py checks that this file installs nothing by other means).
#
#   docker build -t dpwatch:0.1.0 .
#
# At run time it needs the host's kernel headers (/lib/modules and /usr/src), tracefs, the node's
# network namespace and a few capabilities: deploy/daemonset.yaml has all of it, each one explained.
FROM debian:12-slim

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dpwatch" \
      org.opencontainers.image.description="Per-node eBPF datapath observer for Kubernetes: drops, conntrack, MTU, softirq and DNS, with a triage report" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/dpwatch" \
      org.opencontainers.image.documentation="https://example.invalid/dpwatch/blob/main/README.md" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/debian:12-slim"

# The root filesystem is read-only in the DaemonSet: no .pyc files at run time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/dpwatch
# .dockerignore keeps the host's .venv, .git and node_modules out.
COPY . /opt/dpwatch
# --no-kernel: kernel headers and tracefs come from the host at run time (hostPath mounts),
# not from the machine that builds the image.
RUN bash deploy/setup.sh --no-kernel \
 && rm -rf /var/lib/apt/lists/* /root/.cache

EXPOSE 9400
# Kubernetes ignores HEALTHCHECK (the DaemonSet has its own probes); docker and podman use it.
# It assumes the default --listen port 9400.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9400/healthz"]
ENTRYPOINT ["/opt/dpwatch/.venv/bin/dpwatch", "run"]
