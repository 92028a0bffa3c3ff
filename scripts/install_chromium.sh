#!/usr/bin/env bash
# Install a headless browser for the web console tests: Debian's `chromium` and `chromium-driver`
# (Selenium drives the system browser; nothing is downloaded besides Debian's packages).
#
#   scripts/install_chromium.sh
#
# Idempotent and quiet: does nothing when chromium and chromedriver are found. Needs root and apt-get
# to install; otherwise it says so and exits 0, and the browser tests skip.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "install_chromium: chromium/chromedriver not found and cannot install them (needs root and apt-get);" \
       "the web console tests will be skipped" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install_chromium: apt-get install chromium chromium-driver failed" >&2
  exit 1
fi
