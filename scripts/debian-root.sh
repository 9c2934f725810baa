#!/usr/bin/env bash
# A real Debian 12 root, made by debootstrap (minbase with Debian's kernel, systemd and
# curl) from the archive apt uses, for the tests that need one: images/tests/boot.rs boots
# a disk of it by its own kernel, nodeagent/tests/nested/systemd_host.sh runs it as an L1
# host with systemd as PID 1.
#
#   scripts/debian-root.sh      prints the root's path, after making it if needed
#
# It is made once and kept (target/debian-root, or STRATUS_DEBIAN_ROOT; DEBIAN_MIRROR
# overrides the archive). Making it is mostly downloading, so scripts/test.sh starts it in
# the background at the start of the suite; a caller that comes while it is being made
# waits for it instead of making a second one.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${STRATUS_DEBIAN_ROOT:-$repo/target/debian-root}
mkdir -p "$(dirname "$dir")"

exec 9> "$dir.lock"
flock 9
if [ ! -f "$dir/.done" ]; then
    mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/{print $2; exit} /^deb /{for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1)}
    if [ -z "$mirror" ]; then
        echo "debian-root.sh: no Debian archive configured for apt (set DEBIAN_MIRROR)" >&2
        exit 1
    fi
    echo "debian-root.sh: debootstrap bookworm from $mirror into $dir" >&2
    rm -rf "$dir"
    if ! debootstrap --variant=minbase --include=linux-image-amd64,systemd,systemd-sysv,curl \
        bookworm "$dir" "$mirror" > "$dir.log" 2>&1; then
        echo "debian-root.sh: debootstrap failed (log: $dir.log):" >&2
        tail -n 20 "$dir.log" >&2
        exit 1
    fi
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    touch "$dir/.done"
fi
echo "$dir"
