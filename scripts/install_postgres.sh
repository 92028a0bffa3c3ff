#!/usr/bin/env bash
# Install PostgreSQL (Debian's `postgresql` package) for the controller run-store tests:
# tests/support/pg_server.py starts a throwaway cluster from its initdb/pg_ctl/postgres binaries.
#
#   scripts/install_postgres.sh
#
# Idempotent and quiet: does nothing when initdb and pg_ctl are found (/usr/lib/postgresql/*/bin
# or PATH). Needs root and apt-get to install; otherwise it says so and exits 0, and those tests skip.
set -euo pipefail

have_all() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
      return 0
    fi
  done
  command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1
}

if have_all; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "install_postgres: initdb/pg_ctl not found and cannot install them (needs root and apt-get);" \
       "the PostgreSQL store tests will be skipped" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Debian's package creates (and, with systemd, starts) a default cluster; the tests never use it:
# they start their own in a temp dir. On a systemd host we stop the packaged one again.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install_postgres: apt-get install postgresql failed" >&2
  exit 1
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now postgresql >/dev/null 2>&1 || true
fi

have_all || { echo "install_postgres: initdb/pg_ctl still missing after install" >&2; exit 1; }
echo "install_postgres: installed $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n1)" >&2
