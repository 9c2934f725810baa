#!/usr/bin/env bash
# The node agent as a Debian host runs it: packaging/stratus-nodeagent.service under a real
# systemd. An L1 host (QEMU-TCG with nested SVM, like the rest of the nested harness) boots
# a Debian root made by debootstrap (minbase + systemd) from a virtio disk, with systemd as
# PID 1 and a real /dev/kvm from the stock kvm_amd. A test unit inside it then does what an
# operator does: installs the packaged unit unchanged, `systemctl enable --now`s the agent,
# creates a VM through the agent's HTTP API (the project's tiny event-loop guest),
# `systemctl restart`s the agent while the VM runs, SIGKILLs the agent (Restart=on-failure
# brings it back), and checks after each that the VM is still there — the same VMM process —
# and still controllable (pause, resume, graceful shutdown through the power button, delete).
#
# The debootstrapped root (scripts/debian-root.sh) is kept between runs (it takes a few
# minutes to make). Prints "systemd-host: N passed, M failed" and exits non-zero on any failure.
set -euo pipefail
source "$(dirname "$0")/../../../scripts/nested/lib.sh"

fetch_kernel
build_static_programs
build_workspace_debug

W=$(mktemp -d "$NESTED_WORK/systemd.XXXX")
cleanup() { rm -rf "$W"; }
trap cleanup EXIT

# This run's root: the shared Debian root plus the agent, the VMM and the test unit. Its
# kernel and modules stay out: L1 boots the harness's kernel, with modules from the initramfs.
ROOT_CACHE=$(bash "$REPO_ROOT/scripts/debian-root.sh")
R=$W/root
mkdir "$R"
tar -C "$ROOT_CACHE" --exclude=./.done --exclude=./boot --exclude=./usr/lib/modules \
    --exclude=./lib/modules -cf - . | tar -C "$R" -xf -
echo stratus-node > "$R/etc/hostname"
echo "/dev/vda / ext4 rw 0 0" > "$R/etc/fstab"
install -m 0755 "$STATIC_AGENT" "$R/usr/bin/stratus-nodeagent"
install -m 0755 "$STATIC_VMM" "$R/usr/bin/stratus-vmm"
install -m 0755 "$STATIC_JAILER" "$R/usr/bin/stratus-jailer"
mkdir -p "$R/srv/stratus" "$R/etc/stratus"
cp "$REPO_ROOT/packaging/stratus-nodeagent.service" "$R/srv/stratus/"
"$REPO_ROOT/target/debug/examples/test_guest" "$R/srv/stratus/event-loop.vmlinux" event-loop
printf 'systemd-host-token-0123456789\n' > "$R/etc/stratus/token"
chmod 600 "$R/etc/stratus/token"
# Everything else at its default: /var/lib/stratus/nodeagent (StateDirectory=),
# /run/stratus (RuntimeDirectory=), /usr/bin/stratus-vmm, 127.0.0.1:8776.
cat > "$R/etc/stratus/nodeagent.toml" <<'TOML'
token_file = "/etc/stratus/token"
shutdown_timeout_s = 120

[capacity]
cpus = 1
memory_mib = 512
memory_reserve_mib = 0
TOML
cat > "$R/etc/systemd/system/stratus-systemd-test.service" <<'UNIT'
[Unit]
Description=Stratus node agent under systemd: the nested test
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/srv/stratus/test.sh
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
ln -s ../stratus-systemd-test.service "$R/etc/systemd/system/multi-user.target.wants/"
cat > "$R/srv/stratus/test.sh" <<'TEST'
#!/bin/bash
set -u
say() { echo "SD-TEST $*"; }
TOKEN=$(cat /etc/stratus/token)
# api METHOD PATH [BODY]: the status code; the body in /tmp/body.
api() {
    curl -s -o /tmp/body -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -X "$1" "http://127.0.0.1:8776$2" ${3:+--data "$3"}
}
field() { grep -o "\"$1\":[^,}]*" /tmp/body | head -1 | cut -d: -f2 | tr -d '"'; }
wait_api() { for _ in $(seq 600); do [ "$(api GET /host)" = 200 ] && return 0; sleep 0.2; done; return 1; }
# wait_vm STATE: the VM reaches STATE within 120 s.
wait_vm() {
    for _ in $(seq 600); do
        api GET /vms/sd-1 > /dev/null; [ "$(field state)" = "$1" ] && return 0; sleep 0.2
    done
    return 1
}
finish() {
    journalctl -u stratus-nodeagent --no-pager -o cat | tail -n 30 | sed 's/^/SD-AGENT-LOG /'
    say DONE
    systemctl poweroff --no-block
    exit 0
}

[ -c /dev/kvm ] && say KVM
say PID1 "$(cat /proc/1/comm)"
install -m 0644 /srv/stratus/stratus-nodeagent.service /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now stratus-nodeagent.service && say ENABLED
wait_api && say API-UP || finish
say ACTIVE "$(systemctl is-active stratus-nodeagent)"

code=$(api PUT /vms/sd-1 '{"vcpus": 1, "memory_mib": 64, "boot": {"kernel": "/srv/stratus/event-loop.vmlinux"}}')
say CREATED "$code"
wait_vm running || { say NOT-RUNNING "$(cat /tmp/body)"; finish; }
pid=$(field pid)
say RUNNING pid="$pid" alive="$(kill -0 "$pid" && echo yes)"
# The agent's child is the VM's jailer; the VMM is the jailer's child.
say JAILER-CGROUP "$(cut -d: -f3 /proc/"$pid"/cgroup)"
vmm=$(awk '{print $1}' /proc/"$pid"/task/"$pid"/children)
say VMM-CGROUP "$(cut -d: -f3 /proc/"$vmm"/cgroup)" memory.max="$(cat /sys/fs/cgroup/stratus/sd-1/memory.max)"
say VMM-USER uid="$(awk '/^Uid:/{print $2}' /proc/"$vmm"/status)" \
    caps="$(awk '/^CapEff:/{print $2}' /proc/"$vmm"/status)" nspid="$(awk '/^NSpid:/{print $3}' /proc/"$vmm"/status)"
say VMM-ROOT "$(ls /proc/"$vmm"/root/ | tr '\n' ' ')"
[ -S /var/lib/stratus/nodeagent/vms/sd-1/vmm/api.sock ] && say SOCKET-IN-VM-DIRECTORY
[ -d /run/stratus/jails/sd-1 ] && say JAIL-IN-RUNTIME-DIRECTORY
[ -d /var/lib/stratus/nodeagent/vms ] && say STATE-IN-STATE-DIRECTORY

systemctl restart stratus-nodeagent.service
wait_api || finish
api GET /vms/sd-1 > /dev/null
say AFTER-RESTART state="$(field state)" pid="$(field pid)" was="$pid" alive="$(kill -0 "$pid" && echo yes)"

main=$(systemctl show -p MainPID --value stratus-nodeagent)
kill -9 "$main"
for _ in $(seq 300); do
    [ "$(systemctl show -p NRestarts --value stratus-nodeagent)" -ge 1 ] && break; sleep 0.2
done
wait_api || finish
api GET /vms/sd-1 > /dev/null
say AFTER-CRASH restarts="$(systemctl show -p NRestarts --value stratus-nodeagent)" \
    state="$(field state)" pid="$(field pid)" was="$pid" new-main="$([ "$(systemctl show -p MainPID --value stratus-nodeagent)" != "$main" ] && echo yes)"

say PAUSE "$(api POST /vms/sd-1/pause)" "$(field state)"
say RESUME "$(api POST /vms/sd-1/resume)" "$(field state)"
say SHUTDOWN "$(api POST /vms/sd-1/shutdown)"
wait_vm stopped && say STOPPED "$(cat /tmp/body | grep -o '"reason":"[^"]*"' | head -1)"
say DELETE "$(api DELETE /vms/sd-1)" gone="$(api GET /vms/sd-1)"
kill -0 "$pid" 2>/dev/null || kill -0 "$vmm" 2>/dev/null || say VMM-GONE
[ -e /sys/fs/cgroup/stratus/sd-1 ] || [ -e /run/stratus/jails/sd-1 ] || say JAIL-GONE
systemctl stop stratus-nodeagent.service
say STOP "$(systemctl is-active stratus-nodeagent)"
finish
TEST
chmod 755 "$R/srv/stratus/test.sh"
# A 2 GiB sparse ext4 disk with the root in it (no loop device needed).
mke2fs -q -t ext4 -d "$R" "$W/root.img" 2G > /dev/null
rm -rf "$R"

# L1's initramfs: the modules for its disk, ext4 and KVM, then systemd from the disk.
busybox_root "$W/l1"
copy_modules "$W/l1/lib/modules" virtio_mmio virtio_blk ext4 crc32c_generic kvm_amd
mkdir -p "$W/l1/newroot"
write_init "$W/l1" <<'INIT'
echo "L1-INIT"
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vda /newroot || {
    echo "L1-ROOT-NOT-MOUNTED: $(cat /proc/partitions | tr '\n' ' ') virtio: $(ls /sys/bus/virtio/devices)"
    poweroff -f
}
mount --move /dev /newroot/dev
umount /proc /sys
echo "L1-SWITCH-ROOT"
# systemd.show_status: its progress on the console (the harness reads a silent L1 as hung).
exec switch_root /newroot /lib/systemd/systemd systemd.show_status=1
INIT
pack_initramfs "$W/l1" "$W/l1.cpio.gz"

CONSOLE=$NESTED_WORK/systemd_host.console.log
NESTED_QEMU_ARGS=(-drive "file=$W/root.img,if=none,format=raw,id=root,cache=unsafe"
    -device virtio-blk-device,drive=root)
start=$(date +%s)
run_l1 "$W/l1.cpio.gz" "$CONSOLE" 1200 300 || log "L1 did not finish cleanly"
log "L1 finished after $(( $(date +%s) - start )) s"

passed=0; failed=0
ok() { echo "ok: $1"; passed=$((passed + 1)); }
fail() { echo "FAIL: $1"; failed=$((failed + 1)); }
# check DESCRIPTION PATTERN: an extended regular expression on L1's console.
check() { if grep -qE -- "$2" "$CONSOLE"; then ok "$1"; else fail "$1 (console lacks: $2)"; fi; }
check "L1 has /dev/kvm from the stock kvm_amd" "SD-TEST KVM"
check "systemd is PID 1" "SD-TEST PID1 systemd"
check "the packaged unit is enabled and started" "SD-TEST ENABLED"
check "the agent answers on its default address" "SD-TEST API-UP"
check "the unit is active" "SD-TEST ACTIVE active"
check "a VM is created through the agent" "SD-TEST CREATED 201"
check "the VM runs (its VMM is alive)" "SD-TEST RUNNING pid=[0-9]+ alive=yes"
check "the VM's jailer runs in the agent's cgroup" "SD-TEST JAILER-CGROUP /system.slice/stratus-nodeagent.service"
check "the VMM runs in its own cgroup, held to guest RAM + 256 MiB" \
    "SD-TEST VMM-CGROUP /stratus/sd-1 memory.max=335544320"
check "the VMM runs as the VM's own user, without capabilities, as PID 1 of its namespace" \
    "SD-TEST VMM-USER uid=1900000000 caps=0000000000000000 nspid=1"
check "the VMM's root holds only its jail (under the unit's UMask=0077)" "SD-TEST VMM-ROOT dev lib lib64 proc srv usr var[[:space:]]*$"
check "the VMM's socket is in the VM's directory" "SD-TEST SOCKET-IN-VM-DIRECTORY"
check "the jail's root is in RuntimeDirectory=" "SD-TEST JAIL-IN-RUNTIME-DIRECTORY"
check "the VM's record is in StateDirectory=" "SD-TEST STATE-IN-STATE-DIRECTORY"
pid=$(grep -oE "SD-TEST RUNNING pid=[0-9]+" "$CONSOLE" | head -1 | cut -d= -f2 || true)
check "systemctl restart: the VM is still running, the same VMM process" \
    "SD-TEST AFTER-RESTART state=running pid=$pid was=$pid alive=yes"
check "kill -9 of the agent: Restart=on-failure brings it back and it adopts the same VMM" \
    "SD-TEST AFTER-CRASH restarts=1 state=running pid=$pid was=$pid new-main=yes"
check "the VM is paused and resumed" "SD-TEST PAUSE 200 paused"
check "... and resumed" "SD-TEST RESUME 200 running"
check "a graceful shutdown is accepted" "SD-TEST SHUTDOWN 202"
check "the guest powers off on the power button" 'SD-TEST STOPPED "reason":"guest powered off'
check "the ended VM is deleted" "SD-TEST DELETE 204 gone=404"
check "its VMM is gone" "SD-TEST VMM-GONE"
check "its cgroup and jail root are gone" "SD-TEST JAIL-GONE"
check "systemctl stop stops the agent" "SD-TEST STOP (inactive|failed)"
check "the test ran to its end and L1 powered off" "SD-TEST DONE"

if [ $failed -ne 0 ]; then
    echo "---- L1 console (last 80 lines) ----"; tail -n 80 "$CONSOLE"
fi
echo "systemd-host: $passed passed, $failed failed"
[ $failed -eq 0 ]
