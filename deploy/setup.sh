#!/usr/bin/env bash
# dpwatch set-up for Debian 12, as root. Idempotent: run it as often as you like.
#
#   deploy/setup.sh           what the daemon needs
#   deploy/setup.sh --test    plus what the test suite needs
#   deploy/setup.sh --bench   what the benchmark needs (the same as --test)
#
# It installs Debian packages only when missing, makes sure kernel headers are linked at
# /lib/modules/$(uname -r)/build (warning when they are not the running kernel's), mounts
# tracefs, and creates the venv .venv (from /usr/bin/python3 with --system-site-packages,
# so Debian's python3-bpfcc is importable) with dpwatch installed into it.
# The Dockerfile runs this same script.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DPWATCH_VENV:-$here/.venv}"
want_test=0
want_bench=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --bench) want_test=1; want_bench=1 ;;
    --no-kernel) DPWATCH_SKIP_KERNEL=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "setup: unknown option $arg (use --test, --bench or --no-kernel)" >&2; exit 64 ;;
  esac
done

say() { printf 'setup: %s\n' "$*"; }
warn() { printf '\nsetup: WARNING: %s\n\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (it installs Debian packages and loads BPF)" >&2
  exit 1
fi

arch="$(dpkg --print-architecture)"
release="$(uname -r)"

pkgs=(python3 python3-venv python3-pip python3-bpfcc iproute2 nftables conntrack kmod bpftool curl ca-certificates)
# libnftables for Python: the daemon's own nftables table (--notrack: its port kept out of conntrack)
pkgs+=(python3-nftables)
if [ "$want_test" = 1 ] || [ "$want_bench" = 1 ]; then
  # promtool; the bench (its smoke run is part of the tests): trafgen, sockperf, node-exporter
  pkgs+=(prometheus dnsmasq-base netsniff-ng sockperf prometheus-node-exporter)
  # the least-privilege test runs the daemon under capsh with only the DaemonSet's capabilities
  pkgs+=(libcap2-bin)
  # the triage report's HTML view is checked in headless chromium; the node audit's
  # iptables-legacy rule count is checked against rules that iptables-legacy loads
  pkgs+=(chromium iptables)
  # the DNS probe's tests run real resolvers in netns (dnsmasq comes with dnsmasq-base)
  pkgs+=(unbound)
  # the incident library's healthy bulk transfer between pods
  pkgs+=(iperf3)
  # the softirq probe's bench stage runs bcc's softirqs tool (/usr/sbin/softirqs-bpfcc) side by side
  pkgs+=(bpfcc-tools)
fi

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  say "installing: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
[ ${#missing[@]} -gt 0 ] && apt_install "${missing[@]}"

# --- kernel headers: BCC compiles against /lib/modules/$(uname -r)/build -----------------
if [ "${DPWATCH_SKIP_KERNEL:-0}" != 1 ]; then
  build="/lib/modules/$release/build"
  if [ -e "$build/include" ] || [ -e "$build/Makefile" ]; then
    say "kernel headers: $build"
  else
    exact="linux-headers-$release"
    if dpkg-query -W -f='${Status}' "$exact" 2>/dev/null | grep -q "install ok installed"; then
      :
    elif apt-cache show "$exact" >/dev/null 2>&1 || { [ "$apt_updated" = 0 ] && apt-get update -qq && apt_updated=1 && apt-cache show "$exact" >/dev/null 2>&1; }; then
      apt_install "$exact"
    fi
    if [ -e "$build/include" ] || [ -e "$build/Makefile" ]; then
      say "kernel headers: $build ($exact)"
    else
      # No headers for this kernel (e.g. a custom VM kernel): use the distribution's.
      if ! dpkg-query -W -f='${Status}' "linux-headers-$arch" 2>/dev/null | grep -q "install ok installed"; then
        apt_install "linux-headers-$arch"
      fi
      dist_dir="$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)"
      if [ -z "$dist_dir" ]; then
        echo "setup: no kernel headers found under /usr/src after installing linux-headers-$arch" >&2
        exit 1
      fi
      common_dir="${dist_dir%-$arch}-common"
      mkdir -p "/lib/modules/$release"
      ln -sfn "$dist_dir" "$build"
      [ -d "$common_dir" ] && ln -sfn "$common_dir" "/lib/modules/$release/source"
      warn "no kernel headers exist for the running kernel $release.
  Linked the distribution's headers instead: $build -> $dist_dir
  They are for a DIFFERENT kernel ($(basename "$dist_dir" | sed 's/^linux-headers-//')). dpwatch's probes read only
  tracepoint arguments and packet bytes, never struct layouts, so this works; BPF code
  that read kernel structs through these headers would be wrong."
    fi
  fi

  # --- tracefs: BCC attaches tracepoints through it ------------------------------------------
  if [ ! -d /sys/kernel/tracing/events ] && [ ! -d /sys/kernel/debug/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || warn "could not mount tracefs at /sys/kernel/tracing"
  fi
  if [ -d /sys/kernel/debug ] && ! mountpoint -q /sys/kernel/debug; then
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
  fi
fi

# --- the venv ----------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import sys; assert sys.base_prefix == '/usr'" 2>/dev/null \
   || ! grep -q "include-system-site-packages = true" "$venv/pyvenv.cfg" 2>/dev/null; then
  say "creating $venv from /usr/bin/python3 with --system-site-packages"
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
extra=""
[ "$want_test" = 1 ] && extra="[test]"
stamp="$venv/.dpwatch-installed$extra"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ] || ! "$venv/bin/python" -c "import dpwatch" 2>/dev/null; then
  say "installing dpwatch$extra into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$here$extra"
  touch "$stamp"
fi
"$venv/bin/python" -c "import bcc" 2>/dev/null || { echo "setup: 'import bcc' fails in $venv (python3-bpfcc missing?)" >&2; exit 1; }

# --- the dashboards' schema check (tests/unit/test_dashboards.py): typescript and @grafana/schema
# from npm, pinned by dashboards/package-lock.json, into dashboards/node_modules; offline after that.
if [ "$want_test" = 1 ]; then
  command -v npm >/dev/null 2>&1 || apt_install nodejs npm
  dash="$here/dashboards"
  if [ ! -f "$dash/node_modules/.package-lock.json" ] || [ "$dash/package-lock.json" -nt "$dash/node_modules/.package-lock.json" ]; then
    say "installing the dashboards' schema check (npm ci in $dash)"
    (cd "$dash" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
fi
say "ready: $venv/bin/dpwatch"
