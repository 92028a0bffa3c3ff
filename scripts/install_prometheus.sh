#!/usr/bin/env bash
# Install Prometheus and promtool (Debian's `prometheus` package) for the deploy tests:
# `promtool check config|rules`, `promtool test rules` and the real-Prometheus scrape test.
#
#   scripts/install_prometheus.sh
#
# Idempotent and quiet: does nothing when both `prometheus` and `promtool` are on PATH.
# Needs root and apt-get to install; otherwise it says so and exits 0, and those tests skip.
set -euo pipefail

have_all() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

if have_all; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "install_prometheus: prometheus/promtool not found and cannot install them (needs root and apt-get);" \
       "the promtool and real-Prometheus tests will be skipped" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-install-recommends keeps the node exporter and friends out; policy-rc.d-less containers just
# skip starting the service, and on a systemd host we stop it again: tests start their own server.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install_prometheus: apt-get install prometheus failed" >&2
  exit 1
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

have_all || { echo "install_prometheus: prometheus/promtool still missing after install" >&2; exit 1; }
echo "install_prometheus: installed $(prometheus --version 2>&1 | head -n1)" >&2
