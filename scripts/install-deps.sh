#!/bin/bash
# Installs the Debian packages listed in the given files and checks the result.
#
#   scripts/install-deps.sh LIST...               install what is missing, then check
#   scripts/install-deps.sh --check-only LIST...  only check (changes nothing)
#
# A list has one package per line; '#' starts a comment, and a comment of the form
# "# provides: CMD..." names the commands that package must put on PATH
# ("qemu-utils  # provides: qemu-img qemu-io"). Safe to re-run.
#
# Every QEMU package comes from one suite: on Debian 12 from bookworm-backports (QEMU 10),
# pinned together (with the firmware it needs) so that apt can never satisfy one QEMU
# package by removing another, as it did when qemu-utils from backports met qemu-system-x86
# from bookworm. All listed packages are requested in one transaction for the same reason.
# The final check fails at once, in one line, naming every package or command missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

check_only=0
if [ "${1:-}" = "--check-only" ]; then check_only=1; shift; fi
[ $# -gt 0 ] || { echo "usage: $0 [--check-only] PACKAGE-LIST..." >&2; exit 2; }
for list in "$@"; do
    [ -r "$list" ] || { echo "[ERROR] package list $list cannot be read" >&2; exit 2; }
done

packages=$(sed -e 's/#.*//' "$@" | awk 'NF {print $1}' | sort -u)
commands=$(sed -n 's/^[^#[:space:]][^#]*#[[:space:]]*provides:\(.*\)/\1/p' "$@" | tr -s ' \t' '\n' | grep -v '^$' | sort -u || true)

# The QEMU packages installed now must all be of one version.
qemu_versions() {
    dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' 'qemu-*' 2>/dev/null |
        awk '$1 == "ii" && $2 != "qemu-system-data" {print $3}' | sort -u
}

# Prints one line per problem; empty output means the machine has everything.
problems() {
    local p c missing_pkgs="" missing_cmds="" versions
    for p in $packages; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
            missing_pkgs="$missing_pkgs $p"
    done
    for c in $commands; do
        command -v "$c" >/dev/null 2>&1 || missing_cmds="$missing_cmds $c"
    done
    [ -z "$missing_pkgs" ] || echo "packages not installed:$missing_pkgs"
    [ -z "$missing_cmds" ] || echo "commands not on PATH:$missing_cmds"
    versions=$(qemu_versions)
    if [ "$(wc -l <<<"$versions")" -gt 1 ]; then
        echo "QEMU packages of different versions installed: $(tr '\n' ' ' <<<"$versions")"
    fi
    true
}

# Debian 12: QEMU and its firmware from bookworm-backports, pinned together.
use_backports_qemu() {
    local codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ "$codename" = bookworm ] || return 0
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "[deps] adding bookworm-backports (QEMU 10) to apt's sources" >&2
        cat > /etc/apt/sources.list.d/stratus-bookworm-backports.list <<'EOF'
# Added by Stratus scripts/install-deps.sh: QEMU 10 and its firmware (pinned in
# /etc/apt/preferences.d/stratus-qemu); nothing else is taken from backports.
deb http://deb.debian.org/debian bookworm-backports main
EOF
    fi
    cat > /etc/apt/preferences.d/stratus-qemu <<'EOF'
# Added by Stratus scripts/install-deps.sh: every QEMU package from one suite.
Package: qemu-* seabios ipxe-qemu
Pin: release n=bookworm-backports
Pin-Priority: 990
EOF
}

if [ $check_only = 0 ] && [ -n "$(problems)" ]; then
    use_backports_qemu
    echo "[deps] installing:" $packages >&2
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq --no-install-recommends $packages >/dev/null
fi

report=$(problems)
if [ -n "$report" ]; then
    echo "[ERROR] missing after install ($*): $(tr '\n' ';' <<<"$report" | sed 's/;$//; s/;/; /g')" >&2
    exit 1
fi
if [ $check_only = 0 ] && ! command -v cargo >/dev/null; then
    echo "[ERROR] cargo not found: install a Rust toolchain >= 1.94 (rustup) and re-run" >&2
    exit 1
fi
