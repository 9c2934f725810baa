#!/bin/bash
# The cloud end to end with a real second host: the node agent (static stratus-nodeagent
# and stratus-vmm) runs inside a QEMU-TCG L1 host with nested SVM, where the stock Debian
# kernel's kvm_amd gives it a real /dev/kvm. On this (outer) machine run a Marketplace
# (stratus-marketplace), a file server holding a bootable disk image, and
# stratus-orchestrator on SQLite. L1's agent is reached through a forwarded loopback port;
# L1 reaches the image server through QEMU's user network (198.18.64.0/24, restricted: no
# route anywhere else).
#
# The image is a bare ext4 filesystem holding the stock Debian kernel and a busybox
# initramfs in /boot, published with a signed Marketplace entry. A user asks the
# orchestrator for a VM of it with a volatile disk, context pairs, their key and an address
# on the `public` network. The orchestrator places it on L1's node; the agent downloads and
# caches the image, boots the kernel and initrd found inside it with a qcow2 copy-on-write
# root, a 1 GiB volatile disk, the HEPiX context CD and a NIC on the agent's bridge whose
# DHCP server gives the leased address. The test reads the guest's console through the
# orchestrator, shuts the VM down gracefully (the guest handles the power button) and
# checks that the cached base image is unchanged and everything was released.
#
# The VM also has a persistent volume on pdisk's iSCSI pool: a tgtd on this machine
# (loopback), reached from L1 through the user network, the node's VMM logging in with the
# volume's CHAP account under the node's initiator name. The guest writes a stamp to it;
# after the VM ends, a second VM of the same volume reads the stamp back, and the LUN's
# file here holds it.
#
# Prints "nested-cloud: N passed, M failed" and exits non-zero on any failure.
set -euo pipefail
source "$(dirname "$0")/../../../scripts/nested/lib.sh"

fetch_kernel
build_static_programs
build_workspace_debug
BIN=$REPO_ROOT/target/debug

W=$(mktemp -d "$NESTED_WORK/cloud.XXXX")
PIDS=()
cleanup() {
    # run_l1 runs in a subshell: its QEMU (under timeout) goes with it.
    for p in "${PIDS[@]}"; do pkill -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
    declare -F stop_tgtd > /dev/null && stop_tgtd
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
AGENT_PORT=$(free_port); CONTROL_PORT=$(free_port); FILES_PORT=$(free_port)
MARKET_PORT=$(free_port); CLOUD_PORT=$(free_port)
L1_IP=198.18.64.15
# QEMU's user network: its host side, and an address of it forwarded to this machine's
# image server.
GATEWAY=198.18.64.2
IMAGE_HOST=198.18.64.100
PORTAL_HOST=198.18.64.101
GUEST_IP=198.18.66.10
TOKEN=nested-agent-token-0123456789
ADMIN_PASSWORD=nested-admin-password
PUBKEY="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIStratusCloudNestedKey alice@stratus"

# The guest (L2): stock modules, then what a cloud user's VM would check.
busybox_root "$W/guest"
copy_modules "$W/guest/lib/modules" virtio_pci virtio_blk virtio_net isofs button evdev
cat > "$W/guest/udhcpc.sh" <<'SCRIPT'
#!/bin/sh
case "$1" in
bound|renew) ip addr add "$ip/$mask" dev "$interface"; echo "STRATUS-L2-LEASE $ip router=$router hostname=$hostname" ;;
esac
SCRIPT
chmod +x "$W/guest/udhcpc.sh"
write_init "$W/guest" <<'INIT'
echo "STRATUS-L2-INIT cmdline=$(cat /proc/cmdline)"
pb=
for e in /sys/class/input/event*; do
    [ "$(cat $e/device/name 2>/dev/null)" = "Power Button" ] && pb=/dev/input/${e##*/}
done
( [ -c "$pb" ] && dd if=$pb bs=24 count=1 of=/dev/null 2>/dev/null &&
    echo "STRATUS-L2-POWER-BUTTON" && sync && poweroff -f ) &
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
for b in /sys/block/vd*; do
    echo "STRATUS-L2-DISK ${b##*/} serial=$(cat $b/serial 2>/dev/null) sectors=$(cat $b/size) ro=$(cat $b/ro)"
done
label() { dd if=$1 bs=1 skip=32808 count=32 2>/dev/null | tr -d ' '; }
for d in /dev/vd?; do [ "$(label $d)" = _STRATUSLAB ] && ctx=$d; done
mkdir -p /mnt/ctx
if mount -t iso9660 -o ro "$ctx" /mnt/ctx; then
    ( . /mnt/ctx/context.sh; echo "STRATUS-L2-CTX-KEY $PUBLIC_KEY"; echo "STRATUS-L2-CTX-GREETING $GREETING" )
fi
# The root disk: the image's ext4 filesystem (magic 0xef53 at 1080), through the overlay;
# writes go to the overlay, never to the cached image.
root=
for b in /sys/block/vd*; do
    [ "$(dd if=/dev/${b##*/} bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' ')" = 53ef ] && root=/dev/${b##*/}
done
echo "STRATUS-L2-ROOT $root"
dd if=/dev/urandom of=$root bs=4096 seek=4000 count=16 conv=fsync 2>/dev/null && echo "STRATUS-L2-ROOT-WROTE"
for b in /sys/block/vd*; do
    if [ "$(cat $b/serial 2>/dev/null)" = volatile ]; then
        dd if=/dev/urandom of=/dev/${b##*/} bs=65536 count=16 conv=fsync 2>/dev/null && echo "STRATUS-L2-VOLATILE-WROTE"
    fi
done
# A pdisk volume: its serial is the start of its UUID. What a VM before wrote is read
# back, then this VM writes its own stamp.
for b in /sys/block/vd*; do
    serial=$(cat $b/serial 2>/dev/null)
    case "$serial" in
    [0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-*)
        echo "STRATUS-L2-VOLUME-READ $(dd if=/dev/${b##*/} bs=1 count=31 2>/dev/null | tr -cd 'A-Za-z0-9-')"
        stamp="STRATUS-STAMP-$(dd if=/dev/urandom bs=8 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
        printf '%s' "$stamp" | dd of=/dev/${b##*/} conv=fsync 2>/dev/null &&
            echo "STRATUS-L2-VOLUME-WROTE $stamp"
        ;;
    esac
done
ip link set lo up
ip link set eth0 up
echo "STRATUS-L2-NET-QUEUES rx=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l) tx=$(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)"
udhcpc -i eth0 -q -n -t 20 -s /udhcpc.sh
echo "STRATUS-L2-READY"
wait
INIT
pack_initramfs "$W/guest" "$W/guest.cpio.gz"

# The image: the kernel and initramfs in /boot of a bare ext4 filesystem.
mkdir -p "$W/image-tree/boot" "$W/www"
cp "$BZIMAGE" "$W/image-tree/boot/vmlinuz-$KVER"
cp "$W/guest.cpio.gz" "$W/image-tree/boot/initrd.img-$KVER"
mke2fs -q -t ext4 -d "$W/image-tree" "$W/www/debian.img" 64M > /dev/null
IMAGE_SHA=$(sha256sum "$W/www/debian.img" | cut -d' ' -f1)

# The outer machine's services, all on loopback.
python3 -m http.server --bind 127.0.0.1 --directory "$W/www" "$FILES_PORT" > "$W/files.log" 2>&1 &
PIDS+=($!)
make_endorser "$W/pki" StratusLab "Jane Endorser" jane@stratus.test 30
"$BIN/stratus-marketplace" --listen "127.0.0.1:$MARKET_PORT" --db "sqlite://$W/market.db" \
    --trusted-cas "$W/pki/ca.pem" --upload-token-file "$W/pki/upload-token" > "$W/market.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$MARKET_PORT/endorsers" >/dev/null && break; sleep 0.1; done
IMAGE_ID=$("$BIN/examples/publish_image" "$W/www/debian.img" "http://$IMAGE_HOST:8080/debian.img" \
    "http://127.0.0.1:$MARKET_PORT" "$W/pki/endorser.key" "$W/pki/endorser.pem" "$W/pki/upload-token")
log "image $IMAGE_ID published"

# pdisk's iSCSI pool: a throw-away tgtd on loopback, which L1 reaches as $PORTAL_HOST.
bash "$REPO_ROOT/scripts/iscsi-target.sh" start "$W/tgtd"
TGT_PORT=$(cat "$W/tgtd/port"); TGT_CONTROL=$(cat "$W/tgtd/control")
stop_tgtd() { bash "$REPO_ROOT/scripts/iscsi-target.sh" stop "$W/tgtd" || true; }

# L1: KVM, the user network to this machine, the node agent with its own guest network.
busybox_root "$W/l1"
copy_modules "$W/l1/lib/modules" kvm_amd tun bridge virtio_mmio virtio_net $NFT_MODULES
copy_program "$W/l1" nft
cp "$STATIC_VMM" "$W/l1/vmm"
cp "$STATIC_AGENT" "$W/l1/agent"
cp "$STATIC_JAILER" "$W/l1/stratus-jailer"
printf '%s\n' "$TOKEN" > "$W/l1/token"
chmod 600 "$W/l1/token"
cat > "$W/l1/agent.toml" <<TOML
listen = "0.0.0.0:8776"
token_file = "/token"
state_dir = "/var/lib/stratus"
run_dir = "/run/stratus"
vmm_binary = "/vmm"
shutdown_timeout_s = 300

[capacity]
# L1 has one CPU; it offers two so that a 2-vCPU VM (a queue pair per vCPU) fits.
cpus = 2
memory_mib = 1024
memory_reserve_mib = 0

[[networks]]
name = "public"
bridge = "stbr0"
subnet = "198.18.66.0/24"
address = "198.18.66.1"
dns_servers = ["198.18.66.1"]
domain = "nested.stratus.test"
TOML
write_init "$W/l1" <<INIT
[ -c /dev/kvm ] && echo "L1-KVM-READY"
ip link set lo up
# virtio-net probes in the background after insmod: wait for the NIC under TCG.
i=0; while [ ! -e /sys/class/net/eth0 ] && [ \$i -lt 240 ]; do sleep 0.5; i=\$((i+1)); done
ip link set eth0 up
ip addr add $L1_IP/24 dev eth0
mkdir -p /var/lib/stratus /run/stratus
/agent --config /agent.toml > /agent.log 2>&1 &
echo "L1-AGENT-STARTED"
# The outer test connects to the control port when it is done; the FIFO keeps the
# listener's stdin open (busybox nc hangs up when its stdin ends).
mkfifo /nc-in
exec 3<> /nc-in
nc -l -p 9999 < /nc-in > /dev/null
echo "L1-STOP-REQUESTED"
for f in /var/lib/stratus/images/$IMAGE_ID; do echo "L1-BASE-SHA256 \$(sha256sum \$f | cut -d' ' -f1)"; done
ls /var/lib/stratus/vms 2>/dev/null | sed 's/^/L1-LEFT-VM /'
ip -o link show master stbr0 2>/dev/null | sed 's/^/L1-LEFT-PORT /'
sed 's/^/L1-AGENT-LOG /' /agent.log
poweroff -f
INIT
NESTED_COMPRESS="xz -T1 --check=crc32" pack_initramfs "$W/l1" "$W/l1.cpio.xz"

NESTED_QEMU_ARGS=(
    -netdev "user,id=n0,net=198.18.64.0/24,host=$GATEWAY,restrict=on,hostfwd=tcp:127.0.0.1:$AGENT_PORT-$L1_IP:8776,hostfwd=tcp:127.0.0.1:$CONTROL_PORT-$L1_IP:9999,guestfwd=tcp:$IMAGE_HOST:8080-cmd:busybox nc 127.0.0.1 $FILES_PORT,guestfwd=tcp:$PORTAL_HOST:3260-cmd:busybox nc 127.0.0.1 $TGT_PORT"
    -device virtio-net-device,netdev=n0
)
CONSOLE=$NESTED_WORK/cloud_in_l1.console.log
log "booting L1 (console: $CONSOLE)"
start=$(date +%s)
NESTED_SILENT_S=240 run_l1 "$W/l1.cpio.xz" "$CONSOLE" "${NESTED_TIMEOUT:-2400}" &
L1_RUN=$!
PIDS+=($L1_RUN)

passed=0; failed=0
ok() { passed=$((passed + 1)); echo "ok   - $1"; }
fail() { failed=$((failed + 1)); echo "FAIL - $1"; }
# wait_for <seconds> <command...>: retries the command every 2 s.
wait_for() { local limit=$1 i=0; shift; until "$@"; do i=$((i + 2)); [ $i -ge "$limit" ] && return 1; sleep 2; done; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
agent_up() { curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$AGENT_PORT/host" > "$W/host.json"; }
cloud() { curl -s -u "$1" -X "$2" -H 'Content-Type: application/json' "http://127.0.0.1:$CLOUD_PORT$3" ${4:+-d "$4"}; }
admin() { cloud "admin:$ADMIN_PASSWORD" "$@"; }
alice() { cloud "alice:alice-password" "$@"; }

if wait_for 1500 agent_up; then
    ok "the agent in L1 answers through the forwarded port ($(( $(date +%s) - start )) s after L1 started)"
    grep -q '"hypervisor":' "$W/host.json" && echo "     L1 host: $(json 'd["hypervisor"]' < "$W/host.json")"
else
    fail "the agent in L1 answers through the forwarded port"
fi

printf '%s' "$ADMIN_PASSWORD" > "$W/admin-password"
cat > "$W/orchestrator.toml" <<TOML
listen = "127.0.0.1:$CLOUD_PORT"
database = "sqlite://$W/cloud.db"
marketplace_endpoint = "http://127.0.0.1:$MARKET_PORT"
admin_password_file = "$W/admin-password"
poll_interval_s = 2
node_timeout_s = 300
shutdown_timeout_s = 240
volume_dir = "$W/volumes"

[[instance_types]]
name = "nested.small"
cpu = 2
ram_mib = 256
swap_mib = 0

[volume_iscsi]
portal = "$PORTAL_HOST:3260"
control_port = $TGT_CONTROL

[[networks]]
name = "public"
kind = "public"
addresses = ["$GUEST_IP"]
TOML
"$BIN/stratus-orchestrator" --config "$W/orchestrator.toml" > "$W/orchestrator.log" 2>&1 &
PIDS+=($!)
wait_for 60 curl -sf "http://127.0.0.1:$CLOUD_PORT/cimi" -o /dev/null ||
    { fail "the orchestrator starts"; tail -n 20 "$W/orchestrator.log"; }
admin POST /nodes "{\"name\":\"l1\",\"url\":\"http://127.0.0.1:$AGENT_PORT\",\"token\":\"$TOKEN\"}" > "$W/nodes.json"
[ "$(json 'd[0]["health"]' < "$W/nodes.json" 2>/dev/null)" = up ] && ok "the orchestrator registers L1's node and finds it up" \
    || { fail "the orchestrator registers L1's node"; cat "$W/nodes.json"; }
admin POST /users '{"name":"alice","password":"alice-password"}' > /dev/null
alice POST /disks '{"size_gib":1,"tag":"nested"}' > "$W/volume.json"
VOLUME=$(json 'd["uuid"]' < "$W/volume.json" 2>/dev/null || true)
[ -n "$VOLUME" ] && ok "a volume is made on the iSCSI pool ($VOLUME)" || { fail "a volume is made"; cat "$W/volume.json"; }
alice POST /vms "{\"image\":\"$IMAGE_ID\",\"instance_type\":\"nested.small\",\"volatile_disk_gib\":1,\
\"context\":{\"GREETING\":\"hello-from-the-cloud\"},\"public_key\":\"$PUBKEY\",\"persistent_disks\":[\"$VOLUME\"]}" > "$W/run.json"
VM=$(json 'd["vm"]["id"]' < "$W/run.json" 2>/dev/null || true)
[ -n "$VM" ] && ok "the run request is accepted (VM $VM)" || { fail "the run request is accepted"; cat "$W/run.json"; VM=0; }
vm_state() { admin GET "/vms/$VM" | json 'd["state"]' 2>/dev/null; }
running() { [ "$(vm_state)" = Running ]; }
if wait_for 1500 running; then
    ok "the VM runs on L1's node ($(( $(date +%s) - start )) s after L1 started)"
else
    fail "the VM runs on L1's node (state $(vm_state))"; admin GET "/vms/$VM"; echo
fi
admin GET "/vms/$VM" > "$W/vm.json"
[ "$(json 'd["node"]' < "$W/vm.json")" = l1 ] && ok "placed on node l1" || fail "placed on node l1"
[ "$(json 'd["leases"][0]["ip"]' < "$W/vm.json")" = "$GUEST_IP" ] && ok "leased $GUEST_IP" || fail "leased $GUEST_IP"
console() { alice GET "/vms/$VM/console?bytes=1048576" > "$W/console.txt"; grep -q STRATUS-L2-READY "$W/console.txt"; }
wait_for 1200 console || fail "the guest finished its checks (console read through the orchestrator)"
check() {
    if grep -qF -- "$2" "$W/console.txt"; then ok "$1"; else fail "$1 (console lacks: $2)"; fi
}
check "the guest boots the kernel and initrd found in the image" "STRATUS-L2-INIT cmdline="
check "the agent names the root filesystem by its UUID" "root=UUID="
check "the context CD gives the user's key" "STRATUS-L2-CTX-KEY $PUBKEY"
check "the context CD gives the user's pair" "STRATUS-L2-CTX-GREETING hello-from-the-cloud"
check "the 1 GiB volatile disk is there" "serial=volatile sectors=2097152 ro=0"
check "the root disk is the image's ext4 filesystem" "STRATUS-L2-ROOT /dev/vd"
check "the guest writes its root disk" "STRATUS-L2-ROOT-WROTE"
check "the guest writes its volatile disk" "STRATUS-L2-VOLATILE-WROTE"
check "DHCP on the agent's bridge gives the leased address" "STRATUS-L2-LEASE $GUEST_IP router=198.18.66.1 hostname=one-$VM"
check "the guest is ready" "STRATUS-L2-READY"
check "the NIC has a queue pair per vCPU (the orchestrator asks for them)" "STRATUS-L2-NET-QUEUES rx=2 tx=2"
check "the volume (an iSCSI LUN the VMM in L1 logs in to) is there" "serial=${VOLUME:0:20} sectors=2097152 ro=0"
STAMP=$(sed -n 's/.*STRATUS-L2-VOLUME-WROTE \(STRATUS-STAMP-[0-9a-f]*\).*/\1/p' "$W/console.txt" | head -n 1)
[ -n "$STAMP" ] && ok "the guest writes its stamp to the volume" || fail "the guest writes its stamp to the volume"
tgtadm -C "$TGT_CONTROL" --lld iscsi --op show --mode target > "$W/targets.txt" 2>&1 || true
grep -q "iqn.2026-12.eu.stratuslab.node:[0-9]*-l1" "$W/targets.txt" && grep -q "pdisk-$VOLUME" "$W/targets.txt" \
    && ok "the volume's target admits L1's initiator with the volume's CHAP account" \
    || { fail "the volume's target admits L1's initiator with the volume's CHAP account"; cat "$W/targets.txt"; }

alice POST "/vms/$VM/shutdown" > /dev/null
done_() { [ "$(vm_state)" = Done ]; }
if wait_for 600 done_; then ok "a graceful shutdown ends the VM (Done)"; else fail "a graceful shutdown ends the VM (state $(vm_state))"; fi
admin GET "/vms/$VM" > "$W/vm.json"
[ "$(json 'd["reason"]' < "$W/vm.json")" = "shut down" ] && ok "the VM's reason is 'shut down'" || fail "the VM's reason is 'shut down'"
[ "$(json '" ".join(e["state"] for e in d["history"])' < "$W/vm.json")" = "Pending Prolog Running Shutdown Epilog Done" ] \
    && ok "its history is Pending Prolog Running Shutdown Epilog Done" \
    || { fail "its history"; json '" ".join(e["state"] for e in d["history"])' < "$W/vm.json"; }
[ "$(admin GET /networks | json 'd[0]["free"]')" = 1 ] && ok "its address is free again" || fail "its address is free again"
withdrawn() { ! tgtadm -C "$TGT_CONTROL" --lld iscsi --op show --mode target | grep -q "$VOLUME"; }
wait_for 30 withdrawn && ok "the volume's target is withdrawn when the VM ends" || fail "the volume's target is withdrawn when the VM ends"
[ "$(head -c ${#STAMP} "$W/volumes/$VOLUME.img")" = "$STAMP" ] && [ -n "$STAMP" ] \
    && ok "the LUN's file here holds the guest's stamp" || fail "the LUN's file here holds the guest's stamp"

# A second VM of the volume reads the first one's stamp back.
FIRST_VM=$VM
alice POST /vms "{\"image\":\"$IMAGE_ID\",\"instance_type\":\"nested.small\",\"persistent_disks\":[\"$VOLUME\"]}" > "$W/run2.json"
VM=$(json 'd["vm"]["id"]' < "$W/run2.json" 2>/dev/null || true)
[ -n "$VM" ] && ok "a second VM of the volume is accepted (VM $VM)" || { fail "a second VM of the volume is accepted"; cat "$W/run2.json"; VM=0; }
if wait_for 1500 console; then
    check "the second VM's guest reads the first one's stamp from the volume" "STRATUS-L2-VOLUME-READ $STAMP"
else
    fail "the second VM's guest finished its checks (state $(vm_state))"
fi
alice POST "/vms/$VM/kill" > /dev/null
wait_for 600 done_ && ok "the second VM is killed (Done)" || fail "the second VM is killed (state $(vm_state))"
wait_for 30 withdrawn && ok "... and its target withdrawn" || fail "... and its target withdrawn"
alice DELETE "/disks/$VOLUME" > /dev/null
[ ! -e "$W/volumes/$VOLUME.img" ] && ok "the volume is deleted" || fail "the volume is deleted"

# Let L1 finish: it reports what the agent left and the cached image's checksum.
exec 4<>"/dev/tcp/127.0.0.1/$CONTROL_PORT" && exec 4>&-
wait "$L1_RUN" || true
log "L1 finished after $(( $(date +%s) - start )) s"
l1check() {
    if grep -qF -- "$2" "$CONSOLE"; then ok "$1"; else fail "$1 (L1 console lacks: $2)"; fi
}
l1check "L1 has /dev/kvm from the stock kvm_amd" "L1-KVM-READY"
l1check "the cached base image is unchanged" "L1-BASE-SHA256 $IMAGE_SHA"
l1check "the guest powered off on the power button (no hard stop)" "VM $FIRST_VM: guest powered off"
if grep -q "no power-off after" "$CONSOLE"; then fail "the agent had to stop the guest hard"; fi
if grep -qE "L1-LEFT-VM|L1-LEFT-PORT" "$CONSOLE"; then fail "the agent left VM state or a TAP behind"; grep -E "L1-LEFT" "$CONSOLE"; fi

if [ $failed -ne 0 ]; then
    echo "---- guest console ----"; tail -n 40 "$W/console.txt" 2>/dev/null || true
    echo "---- orchestrator log ----"; tail -n 40 "$W/orchestrator.log"
    echo "---- L1 console (last 60 lines) ----"; tail -n 60 "$CONSOLE"
fi
echo "nested-cloud: $passed passed, $failed failed"
[ $failed -eq 0 ]
