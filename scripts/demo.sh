#!/bin/bash
# Main job: the Stratus cloud in one box.
#
#   ./scripts/demo.sh          build what is needed and bring the cloud up, with a demo VM
#   ./scripts/demo.sh --down   stop everything it started and remove its state
#
# Brings up, on this machine: a Marketplace (stratus-marketplace) holding the signed demo
# appliance (scripts/appliance.sh: the stock Debian kernel, busybox, dropbear and a context
# script, on a partitioned ext4 disk image), a file server for the image, the orchestrator
# (stratus-orchestrator on SQLite), one node agent, a user account with a fresh SSH key and
# its StratusLab configuration file, the `stratus-*` commands, and then
# `stratus-run-instance` of the appliance to Running.
#
# The node: on a host with VT-x/AMD-V the agent runs here and its guests' bridge
# (198.18.66.1/24) is this host's. On a host whose /dev/kvm cannot boot stock kernels (PVM,
# no vmx/svm flag) the agent runs inside a QEMU-TCG "node" VM with nested SVM; it is
# reached through a forwarded loopback port, and its guests' bridge is joined to a TAP here
# (198.18.66.254/24) so connect-instance reaches them from this machine.
#
# Settings (environment): STRATUS_CLOUD_DIR (state, default target/cloud), STRATUS_NODE
# (host|nested, default: chosen as above), STRATUS_DEMO_VM=0 (no demo VM),
# STRATUS_PROFILE=debug (debug builds, as the tests use).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STATE=${STRATUS_CLOUD_DIR:-$REPO/target/cloud}
PROFILE=${STRATUS_PROFILE:-release}
TAP=stratusbox0
HOST_BRIDGE=stratusbr0
GUEST_NET=198.18.66
BEGIN=$(date +%s)

say() { printf ' :: [%4ss] %s\n' "$(( $(date +%s) - BEGIN ))" "$*"; }
die() { echo "  [ERROR] $*" >&2; exit 1; }

# Stops one recorded process: TERM, then KILL after 10 s.
stop_pid() {
    local file=$1 pid i
    pid=$(cat "$file" 2>/dev/null) || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    [ -d "$STATE" ] || { say "nothing to stop ($STATE does not exist)"; return 0; }
    # Only a directory this script made is removed, whatever STRATUS_CLOUD_DIR says.
    [ -f "$STATE/.stratus-cloud-in-a-box" ] || die "$STATE was not made by $0: not touching it"
    say "stopping the cloud in $STATE"
    # The node first: with it go its VMs (their stratus-vmm processes outlive an agent).
    if [ -f "$STATE/pids/agent.pid" ]; then
        stop_pid "$STATE/pids/agent.pid"
        pkill -9 -f -- "$STATE/node/" 2>/dev/null || true
        ip link del "$HOST_BRIDGE" 2>/dev/null || true
    fi
    for f in "$STATE"/pids/*.pid; do [ -e "$f" ] && stop_pid "$f"; done
    if [ -f "$STATE/tap" ]; then ip link del "$(cat "$STATE/tap")" 2>/dev/null || true; fi
    rm -rf "$STATE"
    say "stopped; $STATE removed"
}

if [ "${1:-}" = "--down" ]; then down; exit 0; fi
[ $# -eq 0 ] || die "usage: $0 [--down]"
if [ -d "$STATE/pids" ] && ls "$STATE"/pids/*.pid > /dev/null 2>&1; then
    die "a cloud is already up in $STATE: run '$0 --down' first"
fi

say "installing the Debian packages the cloud needs (scripts/runtime-packages.txt)"
bash scripts/install-deps.sh scripts/runtime-packages.txt
command -v cargo > /dev/null || die "no Rust toolchain: install rustup (https://rustup.rs), then run this again"

NESTED_WORK=$REPO/target/nested
source scripts/nested/lib.sh
source scripts/appliance.sh

if [ -n "${STRATUS_NODE:-}" ]; then
    MODE=$STRATUS_NODE; WHY="STRATUS_NODE=$STRATUS_NODE"
elif grep -qwE 'vmx|svm' /proc/cpuinfo; then
    MODE=host; WHY="this CPU has hardware virtualisation: the node agent runs on this machine"
else
    MODE=nested
    WHY="this /dev/kvm has no VT-x/AMD-V (a PVM backend cannot boot stock kernels): the node runs in a QEMU-TCG VM with nested SVM"
fi
case $MODE in host|nested) ;; *) die "STRATUS_NODE must be host or nested, not $MODE" ;; esac
say "node mode: $MODE ($WHY)"

say "building the cloud's programs ($PROFILE)"
if [ "$PROFILE" = release ]; then
    # One invocation: built separately, the two packages would resolve their shared
    # dependencies' features differently and compile them twice.
    cargo build --quiet --release -p stratus-orchestrator -p stratus-images \
        --bin stratus --bin stratus-orchestrator --bin stratus-marketplace
else
    build_workspace_debug
fi
BIN=$REPO/target/$PROFILE
build_static_programs

if [ -e "$STATE" ] && [ ! -f "$STATE/.stratus-cloud-in-a-box" ]; then
    die "$STATE exists and was not made by $0: choose another STRATUS_CLOUD_DIR"
fi
mkdir -p "$STATE"/{pids,logs,www,bin,.ssh}
touch "$STATE/.stratus-cloud-in-a-box"
chmod 700 "$STATE"
"$BIN/stratus" install-links "$STATE/bin"

fetch_kernel
APPLIANCE_KEY=$(cat scripts/appliance.sh scripts/nested/lib.sh | sha256sum | cut -c1-12)
APPLIANCE=$NESTED_WORK/appliance-$KVER-$APPLIANCE_KEY.img
if [ ! -f "$APPLIANCE" ]; then
    say "building the demo appliance (Debian $KVER kernel, busybox, dropbear)"
    build_appliance "$APPLIANCE"
fi
cp --sparse=always "$APPLIANCE" "$STATE/www/stratus-appliance.img"
say "demo appliance: $(du -h --apparent-size "$STATE/www/stratus-appliance.img" | cut -f1) disk image"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MARKET_PORT=$(free_port); FILES_PORT=$(free_port); CLOUD_PORT=$(free_port)
# start <name> <command...>: a daemon in its own session, logged, its pid recorded.
start() {
    local name=$1; shift
    setsid "$@" > "$STATE/logs/$name.log" 2>&1 < /dev/null &
    echo $! > "$STATE/pids/$name.pid"
}
# wait_for <seconds> <what> <command...>
wait_for() {
    local limit=$1 what=$2 i=0; shift 2
    until "$@" > /dev/null 2>&1; do
        i=$((i + 1)); [ $i -ge $((limit * 2)) ] && die "$what did not come up in $limit s (logs: $STATE/logs)"
        sleep 0.5
    done
}

say "starting the Marketplace and the image file server"
start files python3 -m http.server --bind 127.0.0.1 --directory "$STATE/www" "$FILES_PORT"
# The endorser who signs the appliance: a CA of this box (the one the Marketplace trusts)
# and a certificate it issued; and the Marketplace's upload token.
make_endorser "$STATE/pki" "Stratus in a box" "Demo Endorser" demo@stratus.test 365
start marketplace "$BIN/stratus-marketplace" --listen "127.0.0.1:$MARKET_PORT" --db "sqlite://$STATE/marketplace.db" \
    --trusted-cas "$STATE/pki/ca.pem" --upload-token-file "$STATE/pki/upload-token"
wait_for 30 "the Marketplace" curl -sf "http://127.0.0.1:$MARKET_PORT/endorsers"

say "starting the orchestrator (SQLite: $STATE/cloud.db)"
ADMIN_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr '/+' '_-')
( umask 077; printf '%s' "$ADMIN_PASSWORD" > "$STATE/admin-password" )
cat > "$STATE/orchestrator.toml" <<TOML
listen = "127.0.0.1:$CLOUD_PORT"
database = "sqlite://$STATE/cloud.db"
marketplace_endpoint = "http://127.0.0.1:$MARKET_PORT"
admin_password_file = "$STATE/admin-password"
# The web console forwards users' signed entries to the Marketplace with this token.
marketplace_upload_token_file = "$STATE/pki/upload-token"
poll_interval_s = 2
node_timeout_s = 300
# A nested node is slow to boot its guests and to see them power off.
shutdown_timeout_s = 300
# Persistent volumes (pdisk's file backend): files the node opens at the same path — a
# node on this machine directly, the nested node through a 9p share of this directory
# (as a site would share it over NFS).
volume_dir = "$STATE/volumes"

[[networks]]
name = "public"
kind = "public"
addresses = ["$GUEST_NET.10", "$GUEST_NET.11", "$GUEST_NET.12", "$GUEST_NET.13"]
TOML
start orchestrator "$BIN/stratus-orchestrator" --config "$STATE/orchestrator.toml"
wait_for 60 "the orchestrator" curl -sf "http://127.0.0.1:$CLOUD_PORT/cimi"


# The user: a fresh SSH key and the StratusLab configuration file.
ssh-keygen -q -t ed25519 -N '' -C "demo@stratus-in-a-box" -f "$STATE/.ssh/id_ed25519"
DEMO_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr '/+' '_-')
( umask 077; cat > "$STATE/stratuslab-user.cfg" <<CFG
[default]
selected_section = stratus-in-a-box
endpoint_timeout = 10

[stratus-in-a-box]
endpoint = http://127.0.0.1:$CLOUD_PORT
marketplace_endpoint = http://127.0.0.1:$MARKET_PORT
username = demo
password = $DEMO_PASSWORD
user_public_key_file = $STATE/.ssh/id_ed25519.pub
pem_certificate = $STATE/pki/endorser.pem
pem_key = $STATE/pki/endorser.key
marketplace_token_file = $STATE/pki/upload-token
CFG
)
cat > "$STATE/env" <<ENV
# source this file: the stratus-* commands with the demo user's configuration.
export PATH="$STATE/bin:\$PATH"
export STRATUSLAB_CONFIG="$STATE/stratuslab-user.cfg"
ENV
export PATH="$STATE/bin:$PATH" STRATUSLAB_CONFIG="$STATE/stratuslab-user.cfg"
# Secrets go to curl in files only this user can read, never on a command line (ps).
( umask 077; printf 'user = "admin:%s"\n' "$ADMIN_PASSWORD" > "$STATE/admin.curl" )
# admin <method> <path> [<file with the JSON body>]
admin() { curl -sS -K "$STATE/admin.curl" -H 'Content-Type: application/json' -X "$1" "http://127.0.0.1:$CLOUD_PORT$2" ${3:+--data-binary "@$3"}; }
( umask 077; printf '{"name":"demo","password":"%s"}' "$DEMO_PASSWORD" > "$STATE/user.json" )
admin POST /users "$STATE/user.json" > "$STATE/logs/user.json"
rm -f "$STATE/user.json"
grep -q '"name":"demo"' "$STATE/logs/user.json" || die "cannot create the demo user: $(cat "$STATE/logs/user.json")"

AGENT_TOKEN=$(head -c 24 /dev/urandom | base64 | tr '/+' '_-')
if [ "$MODE" = nested ]; then
    # The node VM reaches the image server at this address of QEMU's user network.
    IMAGE_URL=http://198.18.64.100:8080/stratus-appliance.img
else
    IMAGE_URL=http://127.0.0.1:$FILES_PORT/stratus-appliance.img
fi
say "publishing the appliance in the Marketplace (build-metadata, sign-metadata, upload-metadata)"
stratus-build-metadata "$STATE/www/stratus-appliance.img" --location "$IMAGE_URL" \
    --title "Stratus demo appliance" --comment "busybox and dropbear on the Debian $KVER kernel" \
    --os Debian --os-version 12 --os-arch x86_64 --image-version 1 -o "$STATE/appliance.xml" -q
stratus-sign-metadata -q "$STATE/appliance.xml"
stratus-upload-metadata -q "$STATE/appliance.xml"
IMAGE=$(stratus-list-images -q | head -1)
[ -n "$IMAGE" ] || die "the appliance is not in the Marketplace"
echo "$IMAGE" > "$STATE/image"
say "appliance $IMAGE published"

node_config() { # <listen> <state-dir> <run-dir> <vmm> <token-file> <bridge>
    cat <<TOML
listen = "$1"
token_file = "$5"
state_dir = "$2"
run_dir = "$3"
vmm_binary = "$4"
shutdown_timeout_s = 300

[[networks]]
name = "public"
bridge = "$6"
subnet = "$GUEST_NET.0/24"
address = "$GUEST_NET.1"
dns_servers = ["$GUEST_NET.1"]
domain = "stratus.test"
TOML
}

if [ "$MODE" = host ]; then
    AGENT_PORT=$(free_port)
    say "starting the node agent on this machine (guests on bridge $HOST_BRIDGE, $GUEST_NET.1/24)"
    mkdir -p "$STATE/node/state" "$STATE/node/run"
    ( umask 077; echo "$AGENT_TOKEN" > "$STATE/node/token" )
    node_config "127.0.0.1:$AGENT_PORT" "$STATE/node/state" "$STATE/node/run" "$STATIC_VMM" \
        "$STATE/node/token" "$HOST_BRIDGE" > "$STATE/node/agent.toml"
    start agent "$STATIC_AGENT" --config "$STATE/node/agent.toml"
    AGENT_WAIT=60
else
    AGENT_PORT=$(free_port)
    say "building the node VM (QEMU-TCG, nested SVM; console: $STATE/logs/node-console.log)"
    L1=$STATE/node-root
    busybox_root "$L1"
    copy_modules "$L1/lib/modules" kvm_amd tun bridge virtio_mmio virtio_net 9p 9pnet_virtio $NFT_MODULES
    copy_program "$L1" nft
    echo "$STATE/volumes" > "$L1/volume-dir"
    cp "$STATIC_VMM" "$L1/vmm"; cp "$STATIC_JAILER" "$L1/stratus-jailer"; cp "$STATIC_AGENT" "$L1/agent"
    ( umask 077; echo "$AGENT_TOKEN" > "$L1/token" )
    node_config "0.0.0.0:8776" /var/lib/stratus /run/stratus /vmm /token stbr0 > "$L1/agent.toml"
    write_init "$L1" <<'INIT'
[ -c /dev/kvm ] && echo "NODE-KVM-READY"
nic() { for n in /sys/class/net/*; do [ "$(cat $n/address)" = "$1" ] && echo ${n##*/}; done; }
# virtio-net probes in the background after insmod: under TCG the NICs can appear seconds
# later, and configuring a NIC that is not there yet leaves the agent unreachable.
i=0
until UP=$(nic 02:00:c6:12:40:0f); GUESTS=$(nic 02:00:c6:12:42:fe); [ -n "$UP" ] && [ -n "$GUESTS" ]; do
    [ $i -ge 240 ] && { echo "NODE-NICS-MISSING up=$UP guests=$GUESTS"; break; }
    sleep 0.5; i=$((i+1))
done
ip link set lo up
ip link set "$UP" up; ip addr add 198.18.64.15/24 dev "$UP"
mkdir -p /var/lib/stratus /run/stratus
# The cloud's volume directory, shared by the outer machine at the same path.
VOLUMES=$(cat /volume-dir); mkdir -p "$VOLUMES"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 volumes "$VOLUMES" && echo "NODE-VOLUMES-SHARED"
/agent --config /agent.toml > /dev/console 2>&1 &
echo "NODE-AGENT-STARTED"
# The guests' bridge joins the NIC that leads to the outer machine's TAP.
i=0; while [ ! -d /sys/class/net/stbr0 ] && [ $i -lt 600 ]; do sleep 0.5; i=$((i+1)); done
ip link set "$GUESTS" up
ip link set "$GUESTS" master stbr0 2>/dev/null || brctl addif stbr0 "$GUESTS"
echo "NODE-GUEST-NETWORK-UP"
while :; do sleep 3600; done
INIT
    NESTED_COMPRESS="xz -T1 --check=crc32" pack_initramfs "$L1" "$STATE/node.cpio.xz"
    rm -rf "$L1"
    mkdir -p "$STATE/volumes"
    ip tuntap add dev "$TAP" mode tap 2>/dev/null || die "cannot create the TAP $TAP (run as root; is another cloud up?)"
    echo "$TAP" > "$STATE/tap"
    ip addr add "$GUEST_NET.254/24" dev "$TAP"
    ip link set "$TAP" up
    # The volumes are shared with passthrough ownership: the node agent hands each
    # attached volume to its VM's own user, and the jailed VMM opens it as that user.
    # A TCG L1 kernel now and then hangs before printing anything (see run_l1 in
    # scripts/nested/lib.sh): a node VM silent for 60 s is started again.
    for attempt in 1 2 3; do
        say "booting the node VM (attempt $attempt)"
        : > "$STATE/logs/node-console.log"
        start node qemu-system-x86_64 -M "$L1_MACHINE" -accel tcg -cpu max -smp 1 -m 3072 \
            -display none -serial "file:$STATE/logs/node-console.log" -monitor none -no-reboot \
            -kernel "$VMLINUX" -initrd "$STATE/node.cpio.xz" \
            -append "console=ttyS0 panic=-1 quiet tsc_early_khz=$(host_tsc_khz)" \
            -netdev "user,id=up,net=198.18.64.0/24,host=198.18.64.2,restrict=on,hostfwd=tcp:127.0.0.1:$AGENT_PORT-198.18.64.15:8776,guestfwd=tcp:198.18.64.100:8080-cmd:busybox nc 127.0.0.1 $FILES_PORT" \
            -device virtio-net-device,netdev=up,mac=02:00:c6:12:40:0f \
            -netdev "tap,id=guests,ifname=$TAP,script=no,downscript=no" \
            -device virtio-net-device,netdev=guests,mac=02:00:c6:12:42:fe \
            -fsdev "local,id=volumes,path=$STATE/volumes,security_model=passthrough" \
            -device virtio-9p-device,fsdev=volumes,mount_tag=volumes
        for _ in $(seq 120); do [ -s "$STATE/logs/node-console.log" ] && break; sleep 0.5; done
        [ -s "$STATE/logs/node-console.log" ] && break
        stop_pid "$STATE/pids/node.pid"
        [ "$attempt" = 3 ] && die "the node VM printed nothing in three boots"
    done
    AGENT_WAIT=1800
fi
say "waiting for the node agent"
( umask 077; printf 'header = "Authorization: Bearer %s"\n' "$AGENT_TOKEN" > "$STATE/agent.curl"
  printf '{"name":"node-1","url":"http://127.0.0.1:%s","token":"%s"}' "$AGENT_PORT" "$AGENT_TOKEN" > "$STATE/node.json" )
wait_for "$AGENT_WAIT" "the node agent" curl -sf -K "$STATE/agent.curl" "http://127.0.0.1:$AGENT_PORT/host"
admin POST /nodes "$STATE/node.json" > "$STATE/logs/node.json"
rm -f "$STATE/node.json"
grep -q '"health":"up"' "$STATE/logs/node.json" || die "the orchestrator cannot use the node: $(cat "$STATE/logs/node.json")"
if [ "$MODE" = nested ]; then
    wait_for 120 "the node's guest network" grep -q NODE-GUEST-NETWORK-UP "$STATE/logs/node-console.log"
fi
say "node-1 is up"
STRATUSLAB_USERNAME=admin STRATUSLAB_PASSWORD=$ADMIN_PASSWORD stratus-describe-nodes

if [ "${STRATUS_DEMO_VM:-1}" != 0 ]; then
    say "starting a demo VM: stratus-run-instance -t t1.micro --wait $IMAGE"
    stratus-run-instance -t t1.micro --wait=1800 "$IMAGE" | tee "$STATE/logs/run.txt"
    VM=$(sed -n 's/.*(vm ID: \([0-9]*\)).*/\1/p' "$STATE/logs/run.txt")
    say "VM $VM is Running; waiting for its SSH server"
    wait_for 900 "SSH on VM $VM" stratus-connect-instance "$VM" true
    stratus-connect-instance "$VM" 'echo "     $(hostname): $(uname -sr), $(nproc) vCPU, up $(cut -d. -f1 /proc/uptime) s"'
fi

say "the cloud is up ($(( $(date +%s) - BEGIN )) s). Try:"
cat <<NEXT

    source $STATE/env
    stratus-describe-instance
    stratus-list-images
NEXT
[ -n "${VM:-}" ] && echo "    stratus-connect-instance $VM"
cat <<NEXT
    stratus-run-instance -t t1.micro --wait $IMAGE

  The web console: http://127.0.0.1:$CLOUD_PORT/ui/ (user demo, its password is in
  $STATE/stratuslab-user.cfg; admin's in $STATE/admin-password)

  Stop it all and remove its state:  $0 --down
NEXT
