#!/usr/bin/env bash
# Install the Debian packages the project needs, only those missing, so that
# `make test` / `make demo` work on a fresh Debian machine. Needs root (or sudo)
# only when something is actually missing.
set -euo pipefail

missing=()
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv python3-pip)
# `tlbsim trace record` runs programs under strace (system calls) and valgrind (accesses).
command -v strace >/dev/null || missing+=(strace)
command -v valgrind >/dev/null || missing+=(valgrind)
# The observability tests run a real Prometheus; the package also ships promtool.
command -v promtool >/dev/null || missing+=(prometheus)
# The mqtt transport (`tlbsim up --mqtt`, tests/mqtt) runs a real broker; Debian puts it
# in /usr/sbin, which is not on every user's PATH.
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)

[ ${#missing[@]} -eq 0 ] && exit 0
echo "setup: installing Debian packages: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
if ! command -v apt-get >/dev/null; then
    echo "setup: missing ${missing[*]} and no apt-get to install them" >&2
    exit 1
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
