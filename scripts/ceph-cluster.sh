#!/bin/bash
# A throw-away single-node Ceph cluster for tests and developers: Debian's ceph-mon and
# ceph-osd (ceph 16.2; packages ceph-mon ceph-osd ceph-common) on loopback, all of its
# state in one directory, the OSD on memstore (in memory, 1 GiB by default).
#
#   scripts/ceph-cluster.sh start DIR     start one monitor (mon.a) and one OSD (osd.0), create
#                                         the pool "rbd" and the user client.stratus; returns
#                                         once an image can be created in the pool (a few s)
#   scripts/ceph-cluster.sh stop DIR      stop the daemons (the directory and its files stay)
#   scripts/ceph-cluster.sh conf DIR      print the path of DIR/ceph.conf
#
# Environment: CEPH_CLUSTER_TIMEOUT (seconds start waits, 60), CEPH_CLUSTER_MEMSTORE_BYTES
# (the OSD's size, 1 GiB; it is held in memory). start wipes the cluster files of an earlier
# start in DIR: every start makes a new, empty cluster.
#
# Clients use `-c DIR/ceph.conf`: client.admin finds its keyring (DIR/client.admin.keyring)
# through it; client.stratus (caps: mon 'profile rbd', osd 'profile rbd pool=rbd') needs
# `--id stratus --keyring DIR/client.stratus.keyring`. cephx is on. The monitor listens on
# 127.0.0.1 on two free ports (msgr v2 and v1, both in mon host); the OSD binds 127.0.0.1.
# CEPH_CLUSTER_ADDR puts both on another local address instead (the nested harness serves
# an L1 guest from a network namespace's TAP: loopback is out of its reach).
# No ceph-mgr runs: rbd create/snap/export/import/bench and librbd work without one, but
# `ceph health` turns to HEALTH_WARN (MGR_DOWN) two minutes after start, `ceph df` shows
# zeros, and `ceph pg stat`, `ceph osd pool stats` and `rbd trash purge schedule` hang.
# Nothing touches /etc/ceph, /var/lib/ceph, /var/log/ceph, /var/run/ceph or systemd. The
# daemons run as the caller (root here); logs are in DIR/log, pid files and sockets in DIR/run.
set -euo pipefail

die() { echo "[ERROR] ceph-cluster: $*" >&2; exit 1; }

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 start|stop|conf DIR"

START_TIMEOUT=${CEPH_CLUSTER_TIMEOUT:-60}              # seconds start waits for the pool
MEMSTORE_BYTES=${CEPH_CLUSTER_MEMSTORE_BYTES:-1073741824}  # the OSD's size (it is in memory)
ADDR=${CEPH_CLUSTER_ADDR:-127.0.0.1}                     # where the daemons listen
DAEMONS="mon.a osd.0"

need() {
    local c
    for c in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd python3; do
        command -v "$c" >/dev/null ||
            die "$c not found: install Debian's ceph-mon ceph-osd ceph-common python3"
    done
}

# Two free TCP ports on ADDR (msgr v2 and v1 of the monitor).
free_ports() {
    python3 -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("'"$ADDR"'", 0))
print(*[s.getsockname()[1] for s in ss])'
}

log_tail() {
    local f
    for f in "$dir"/log/*.log; do
        [ -f "$f" ] && [ "${f##*/}" != ceph.audit.log ] || continue
        echo "--- $f"
        tail -n 10 "$f"
    done
}

osd_job=""   # the background job that makes and starts the OSD

fail() {
    echo "[ERROR] ceph-cluster: $*" >&2
    log_tail >&2
    [ -z "$osd_job" ] || wait "$osd_job" || true
    stop
    exit 1
}

# ceph_pid PID: PID is a live ceph daemon (not a zombie, nor a recycled pid of another program)
ceph_pid() {
    local comm state
    read -r _ comm state _ <"/proc/$1/stat" 2>/dev/null || return 1
    [[ $comm == "(ceph-"* && $state != Z ]]
}

running() {  # running NAME: the daemon's pid file names a live daemon
    local f=$dir/run/$1.pid
    [ -f "$f" ] && ceph_pid "$(cat "$f")"
}

alive_or_fail() {
    local d
    for d in "$@"; do running "$d" || fail "$d exited"; done
}

authtool() { ceph-authtool "$@" >>"$dir/log/mkfs.log" 2>&1 || fail "ceph-authtool $1 failed"; }

c() { timeout 30 ceph -c "$dir/ceph.conf" --connect-timeout 15 "$@"; }

# stop_one NAME: SIGTERM, then SIGKILL after 5 s; waits until the process is gone.
stop_one() {
    local f=$dir/run/$1.pid pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if ceph_pid "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do ceph_pid "$pid" || break; sleep 0.05; done
        if ceph_pid "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
            for _ in $(seq 100); do ceph_pid "$pid" || break; sleep 0.05; done
        fi
        ! ceph_pid "$pid" || die "$1 (pid $pid) did not exit"
    fi
    rm -f "$f" "$dir/run/$1.asok"
}

# The OSD first: it tells the monitor it is going down and waits for the answer.
stop() { stop_one osd.0; stop_one mon.a; }

write_conf() {
    local fsid=$1 port2=$2 port1=$3
    cat >"$dir/ceph.conf" <<EOF
# written by scripts/ceph-cluster.sh: a throw-away single-node cluster
[global]
fsid = $fsid
mon host = [v2:$ADDR:$port2,v1:$ADDR:$port1]
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $dir/run
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool delete = true
mon warn on pool no redundancy = false
paxos propose interval = 0.1
mon data avail warn = 2
mon data avail crit = 1

[mon]
mon data = $dir/\$name
mon cluster log file = default=$dir/log/\$cluster.\$channel.log cluster=$dir/log/\$cluster.log
keyring = $dir/\$name/keyring
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok

[osd]
osd data = $dir/\$name
keyring = $dir/\$name/keyring
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
public addr = $ADDR
cluster addr = $ADDR
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd crush update on start = true

[client.admin]
keyring = $dir/client.admin.keyring
EOF
}

start() {
    need
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local d
    for d in $DAEMONS; do ! running "$d" || die "$dir already has a running cluster ($d)"; done
    rm -rf "$dir/mon.a" "$dir/osd.0" "$dir/run" "$dir/log" "$dir/crash" "$dir/monmap" \
        "$dir/ceph.conf" "$dir/client.admin.keyring" "$dir/client.stratus.keyring"
    mkdir -p "$dir/mon.a" "$dir/osd.0" "$dir/run" "$dir/log" "$dir/crash"

    local fsid osd_uuid ports port2 port1 t0 deadline
    t0=$(date +%s)
    deadline=$((t0 + START_TIMEOUT))
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    ports=$(free_ports)
    port2=${ports% *}; port1=${ports#* }
    write_conf "$fsid" "$port2" "$port1"

    # Keys: the monitor's keyring holds every key of the cluster at mkfs, so no bootstrap
    # user is needed; each daemon and client.admin has its own keyring file.
    local tmp=$dir/mon.a.keyring.mkfs
    authtool --create-keyring "$tmp" --gen-key -n mon. --cap mon 'allow *'
    authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
    authtool --create-keyring "$dir/osd.0/keyring" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd'
    authtool "$tmp" --import-keyring "$dir/client.admin.keyring"
    authtool "$tmp" --import-keyring "$dir/osd.0/keyring"

    monmaptool --create --fsid "$fsid" \
        --addv a "[v2:$ADDR:$port2,v1:$ADDR:$port1]" "$dir/monmap" \
        >>"$dir/log/mkfs.log" 2>&1 || fail "monmaptool failed"
    ceph-mon -c "$dir/ceph.conf" --cluster ceph -i a --mkfs --monmap "$dir/monmap" \
        --keyring "$tmp" >>"$dir/log/mkfs.log" 2>&1 ||
        fail "ceph-mon --mkfs failed: $(tail -3 "$dir/log/mkfs.log")"
    rm -f "$tmp"
    timeout 30 ceph-mon -c "$dir/ceph.conf" --cluster ceph -i a >>"$dir/log/mkfs.log" 2>&1 ||
        fail "ceph-mon did not start"

    # The OSD: register its id and uuid, make its store, start it.
    local id
    id=$(c osd new "$osd_uuid" 0 2>>"$dir/log/mkfs.log") ||
        fail "ceph osd new failed (is the monitor up?)"
    [ "$id" = 0 ] || fail "ceph osd new gave id '$id', not 0"
    # (in the background: the monitor answers the commands below while the OSD boots)
    (timeout 30 ceph-osd -c "$dir/ceph.conf" --cluster ceph -i 0 --mkfs \
            --osd-uuid "$osd_uuid" &&
        timeout 30 ceph-osd -c "$dir/ceph.conf" --cluster ceph -i 0) >>"$dir/log/osd-start.log" 2>&1 &
    osd_job=$!

    # The pool and the unprivileged user.
    c osd pool create rbd 8 8 >>"$dir/log/mkfs.log" 2>&1 || fail "ceph osd pool create rbd failed"
    c osd pool application enable rbd rbd >>"$dir/log/mkfs.log" 2>&1 ||
        fail "ceph osd pool application enable failed"
    c auth get-or-create client.stratus mon 'profile rbd' osd 'profile rbd pool=rbd' \
        mgr 'profile rbd pool=rbd' -o "$dir/client.stratus.keyring" >>"$dir/log/mkfs.log" 2>&1 ||
        fail "ceph auth get-or-create client.stratus failed"
    local job=$osd_job; osd_job=""
    wait "$job" || fail "ceph-osd did not start: $(tail -3 "$dir/log/osd-start.log")"

    # Ready once an image can be created and listed (this waits for the PGs to be active).
    local probe=ceph-cluster-probe left
    while :; do
        alive_or_fail $DAEMONS
        left=$((deadline - $(date +%s)))
        [ "$left" -gt 0 ] || fail "the pool rbd was not usable within ${START_TIMEOUT}s"
        [ "$left" -le 10 ] || left=10
        if timeout "$left" rbd -c "$dir/ceph.conf" create "rbd/$probe" --size 1M \
                >>"$dir/log/mkfs.log" 2>&1 &&
            rbd -c "$dir/ceph.conf" ls rbd 2>>"$dir/log/mkfs.log" | grep -qx "$probe"; then
            break
        fi
        # a create cut short may have left part of the image behind
        timeout 10 rbd -c "$dir/ceph.conf" rm --no-progress "rbd/$probe" >/dev/null 2>&1 || true
        sleep 0.5
    done
    rbd -c "$dir/ceph.conf" rm --no-progress "rbd/$probe" >>"$dir/log/mkfs.log" 2>&1 ||
        fail "could not remove the probe image"
    echo "ceph-cluster: up in $(( $(date +%s) - t0 ))s: -c $dir/ceph.conf" >&2
}

case $cmd in
start) start ;;
stop)
    [ -d "$dir" ] || exit 0
    dir=$(cd "$dir" && pwd)
    stop
    ;;
conf)
    dir=$(cd "$dir" 2>/dev/null && pwd) || die "$2 does not exist"
    [ -f "$dir/ceph.conf" ] || die "$dir/ceph.conf does not exist (run start first)"
    echo "$dir/ceph.conf"
    ;;
*) die "unknown command $cmd" ;;
esac
