# dpwatch container image. Built with the same set-up script the README uses.
# At run time it needs the host's /lib/modules and /usr/src (kernel headers for BCC),
# host PID/network namespaces, and privileges to load BPF: see deploy/daemonset.yaml.
FROM debian:12-slim

LABEL org.opencontainers.image.title="dpwatch" \
      org.opencontainers.image.description="Per-node eBPF datapath observer for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/dpwatch" \
      org.opencontainers.image.version="0.1.0"

WORKDIR /opt/dpwatch
COPY . /opt/dpwatch
# --no-kernel: headers and tracefs come from the host at run time, not from the build machine.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends make \
 && bash deploy/setup.sh --no-kernel \
 && rm -rf /var/lib/apt/lists/* /root/.cache

EXPOSE 9400
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD curl -fsS http://127.0.0.1:9400/healthz || exit 1
ENTRYPOINT ["/opt/dpwatch/.venv/bin/dpwatch", "run"]
