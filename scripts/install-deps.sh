#!/bin/bash
# Installs the Debian packages listed in the given files (one per line, # comments) and
# checks for the Rust toolchain. Safe to re-run.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=$(sed -e 's/#.*//' "$@" | tr -s ' \n' '\n' | sort -u | tr '\n' ' ')
missing=$(for p in $packages; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"; done)
if [ -n "$missing" ]; then
    echo "[deps] installing: $missing" >&2
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "[ERROR] cargo not found: install a Rust toolchain >= 1.94 (rustup) and re-run" >&2
    exit 1
fi
