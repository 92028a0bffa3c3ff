#!/usr/bin/env bash
# Install the pinned agent CLIs (Claude Code, Codex, Gemini CLI) with npm into a cache
# directory OUTSIDE the repository, for the real-CLI conformance tests.
#
#   scripts/install_clis.sh            # installs into ${ASM_CLI_CACHE:-$HOME/.cache/asm-clis}
#   ASM_CLI_CACHE=/opt/clis scripts/install_clis.sh
#
# Idempotent: a package whose installed version already matches the pin is skipped.
# Quiet on success apart from a summary (bin paths and `--version` of each CLI).
# If node/npm are missing and we are root with apt-get, Debian's nodejs and npm are installed first.
set -euo pipefail

CACHE=${ASM_CLI_CACHE:-$HOME/.cache/asm-clis}
PINS=(
  "@anthropic-ai/claude-code@2.1.197:claude"
  "@openai/codex@0.169.0:codex"
  "@google/gemini-cli@0.61.0:gemini"
)

die() { echo "install_clis: $*" >&2; exit 1; }

start=$(date +%s)

# --- node / npm ---------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "install_clis: node/npm missing; installing Debian's nodejs and npm" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq nodejs npm >/dev/null
  else
    die "node and npm are required (install Node.js >= 18 and npm, or run as root on Debian/Ubuntu)"
  fi
fi
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || die "node/npm still missing after install attempt"
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || die "Node.js >= 18 is required (found $(node --version))"

# Refuse a cache inside the repository (the bundles are hundreds of MB).
repo_root=$(cd "$(dirname "$0")/.." && pwd -P)
cache_abs=$(realpath -m -- "$CACHE")
case "$cache_abs/" in
  "$repo_root"/*) die "ASM_CLI_CACHE ($cache_abs) must be outside the repository ($repo_root)";;
esac
mkdir -p "$cache_abs"
CACHE=$cache_abs

# --- which pins are missing ---------------------------------------------------
installed_version() {  # $1 = package name -> prints version or nothing
  local pj="$CACHE/node_modules/$1/package.json"
  [ -f "$pj" ] || return 0
  node -e 'try { process.stdout.write(require(process.argv[1]).version || "") } catch (e) {}' "$pj"
}

todo=()
for entry in "${PINS[@]}"; do
  spec=${entry%:*}                 # @scope/name@version
  pkg=${spec%@*}
  ver=${spec##*@}
  have=$(installed_version "$pkg")
  if [ "$have" != "$ver" ]; then
    todo+=("$spec")
  fi
done

# A package.json in the cache keeps npm from walking up to some unrelated project.
[ -f "$CACHE/package.json" ] || printf '{\n  "name": "asm-cli-cache",\n  "private": true\n}\n' >"$CACHE/package.json"

if [ ${#todo[@]} -gt 0 ]; then
  log="$CACHE/npm-install.log"
  # --prefix keeps everything under the cache; nothing is installed globally.
  if ! npm install --prefix "$CACHE" --no-audit --no-fund --no-update-notifier --loglevel=error \
        --save-exact "${todo[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    die "npm install failed (${todo[*]})"
  fi
fi

# --- verify -------------------------------------------------------------------
status=0
summary=()
for entry in "${PINS[@]}"; do
  spec=${entry%:*}
  bin=${entry##*:}
  pkg=${spec%@*}
  ver=${spec##*@}
  path="$CACHE/node_modules/.bin/$bin"
  have=$(installed_version "$pkg")
  if [ "$have" != "$ver" ]; then
    echo "install_clis: $pkg is at '${have:-missing}', expected $ver" >&2
    status=1
    continue
  fi
  if [ ! -x "$path" ]; then
    echo "install_clis: $path is missing" >&2
    status=1
    continue
  fi
  # --version works offline for all three; HOME is pointed at a throwaway dir so nothing is written to ours.
  vhome=$(mktemp -d)
  if out=$(HOME="$vhome" DISABLE_AUTOUPDATER=1 DISABLE_TELEMETRY=1 timeout 60 "$path" --version </dev/null 2>&1); then
    summary+=("$(printf '%-7s %-10s %s' "$bin" "$(echo "$out" | tail -n1 | tr -d '\r')" "$path")")
  else
    echo "install_clis: '$path --version' failed: $out" >&2
    status=1
  fi
  rm -rf "$vhome"
done

elapsed=$(( $(date +%s) - start ))
if [ ${#todo[@]} -gt 0 ]; then action="installed ${#todo[@]} package(s)"; else action="already installed"; fi
echo "install_clis: $action in $CACHE (${elapsed}s)"
for line in "${summary[@]}"; do echo "  $line"; done
exit $status
