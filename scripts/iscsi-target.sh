#!/bin/bash
# A throw-away iSCSI target for tests and developers: Debian's tgtd (package tgt) on
# loopback, its state in one directory, file-backed LUNs.
#
#   scripts/iscsi-target.sh start DIR [PORT]    start tgtd on 127.0.0.1:PORT (default: a free port)
#   scripts/iscsi-target.sh add DIR IQN FILE [thin] [USER SECRET]
#                                               a target with FILE as LUN 1; "thin" enables
#                                               thin provisioning (UNMAP); USER/SECRET require CHAP
#   scripts/iscsi-target.sh restart DIR         stop tgtd and start it again with the same targets
#   scripts/iscsi-target.sh stop DIR            stop tgtd (the directory and its files stay)
#   scripts/iscsi-target.sh port DIR            print the portal's port
#
# Each instance has its own control port (tgtadm -C), so instances never meet each other
# or a system tgtd. tgtd needs root (its control socket lives in /run/tgtd).
set -euo pipefail

die() { echo "[ERROR] iscsi-target: $*" >&2; exit 1; }
command -v tgtd >/dev/null && command -v tgtadm >/dev/null ||
    die "tgtd/tgtadm not found: install Debian's tgt (scripts/install-deps.sh scripts/test-packages.txt)"

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 start|add|restart|stop|port DIR ..."

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A control port no other tgtd uses: its socket file does not exist yet.
free_control() {
    local n
    for _ in $(seq 100); do
        n=$(( (RANDOM % 30000) + 1000 ))
        [ -e "/run/tgtd/socket.$n" ] || { echo "$n"; return; }
    done
    die "no free tgtd control port"
}

adm() { tgtadm -C "$(cat "$dir/control")" --lld iscsi "$@"; }

launch() {
    local port=$1 control=$2
    mkdir -p /run/tgtd
    setsid tgtd -f -C "$control" --iscsi "portal=127.0.0.1:$port" >>"$dir/tgtd.log" 2>&1 &
    echo $! >"$dir/pid"
    for _ in $(seq 100); do
        tgtadm -C "$control" --op show --mode sys >/dev/null 2>&1 && return 0
        kill -0 "$(cat "$dir/pid")" 2>/dev/null || die "tgtd exited at start: $(tail -3 "$dir/tgtd.log")"
        sleep 0.05
    done
    die "tgtd did not answer on control port $control"
}

# add_target TID IQN FILE THIN [USER SECRET]
add_target() {
    local tid=$1 iqn=$2 file=$3 thin=$4 user=${5:-} secret=${6:-}
    adm --op new --mode target --tid "$tid" -T "$iqn"
    adm --op new --mode logicalunit --tid "$tid" --lun 1 -b "$file"
    if [ "$thin" = thin ]; then
        adm --op update --mode logicalunit --tid "$tid" --lun 1 --params thin_provisioning=1
    fi
    if [ -n "$user" ]; then
        adm --op new --mode account --user "$user" --password "$secret" 2>/dev/null || true
        adm --op bind --mode account --tid "$tid" --user "$user"
    fi
    adm --op bind --mode target --tid "$tid" -I ALL
}

stop() {
    [ -f "$dir/pid" ] || return 0
    local pid; pid=$(cat "$dir/pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    fi
    rm -f "$dir/pid" "/run/tgtd/socket.$(cat "$dir/control").lock" "/run/tgtd/socket.$(cat "$dir/control")"
}

case $cmd in
start)
    mkdir -p "$dir"
    [ ! -f "$dir/pid" ] || ! kill -0 "$(cat "$dir/pid")" 2>/dev/null || die "$dir already has a running tgtd"
    port=${3:-$(free_port)}
    echo "$port" >"$dir/port"
    free_control >"$dir/control"
    : >"$dir/targets"
    launch "$port" "$(cat "$dir/control")"
    ;;
add)
    iqn=${3:?IQN}; file=${4:?FILE}; thin=${5:-}; user=${6:-}; secret=${7:-}
    [ -f "$file" ] || die "$file does not exist"
    if [ "$thin" != thin ]; then user=$thin; secret=${6:-}; thin=""; fi
    tid=$(( $(wc -l <"$dir/targets") + 1 ))
    add_target "$tid" "$iqn" "$file" "$thin" "$user" "$secret"
    echo "$tid $iqn $file ${thin:--} $user $secret" >>"$dir/targets"
    ;;
restart)
    stop
    launch "$(cat "$dir/port")" "$(cat "$dir/control")"
    while read -r tid iqn file thin user secret; do
        [ "$thin" = - ] && thin=""
        add_target "$tid" "$iqn" "$file" "$thin" "$user" "$secret"
    done <"$dir/targets"
    ;;
stop) stop ;;
port) cat "$dir/port" ;;
*) die "unknown command $cmd" ;;
esac
