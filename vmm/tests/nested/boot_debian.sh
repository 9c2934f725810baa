#!/bin/bash
# Real Linux on stratus-vmm, inside a QEMU-TCG L1 guest with nested SVM. Two guests run
# one after the other in the same L1:
# 1. the current Debian kernel's vmlinux (PVH entry), 2 vCPUs, a read-write virtio-blk
#    disk: the guest checks nproc, the disk's serial, reads a marker, writes a pattern and
#    powers off; the disk file's SHA-256 is checked after the VMM exits;
# 2. the same kernel as bzImage (64-bit boot protocol), 1 vCPU, a read-only disk: writes
#    must fail, then the guest panics and the VMM must exit with the panic status (2).
# The first guest also finds its context disks made by stratus-contextualizer (HEPiX CD
# labelled _STRATUSLAB, NoCloud labelled cidata) by label, mounts them with the stock
# isofs module and reads the values back.
# It also has a virtio-net NIC with two queue pairs on a multiqueue TAP bridged in L1 (the
# guest's driver uses both, one per vCPU): it gets its fixed address by DHCP from
# stratus-nodeagent's DHCP server running in L1 (from a StratusLab pool definition), pings
# L1 and moves a file each way; the checksums are compared.
# It also has a 64 MiB data disk for fio (found by its serial): Debian's fio runs in the
# guest with O_DIRECT and io_uring at queue depth 32, random writes of 4-64 KiB over the
# first 32 MiB with a crc32c verify header in every 4 KiB (its offset and checksum), and
# verifies them in the guest; after the VMM exits, fio in L1 re-reads the image file with
# --verify_only (same job and seed, psync) and checks every block's offset and checksum.
# The guest also writes a random file generated here with dd oflag=direct at 48 MiB, and L1
# compares the SHA-256 of everything past fio's area (the file, zeros around it).
# 3. the vmlinux again, with no devices and an API socket: L1 drives it through the VMM's
#    control API (static api_call helper): a disk hot-plugged after boot appears with its
#    serial (the stock acpiphp), the guest writes to it, DELETE makes the guest eject it and
#    the data is in the host file; a hot-plugged NIC gets its DHCP lease; pause stops the
#    guest's once-a-second output and resume restarts it; the power button (GED -> the stock
#    button driver -> an evdev key press this init waits for) powers it off, exit status 0.
# The first guest also checks the CMOS RTC: rtc_cmos binds, and both the RTC and the system
# clock agree with L1's clock (read over HTTP) within a second.
# The guests load the stock virtio-pci, virtio-blk, virtio-net, isofs, pvpanic, button and
# evdev modules.
# Prints "nested: N passed, M failed" and exits non-zero on any failure.
set -euo pipefail
source "$(dirname "$0")/../../../scripts/nested/lib.sh"

fetch_kernel
build_static_programs
build_workspace_debug

W=$(mktemp -d "$NESTED_WORK/boot.XXXX")
trap 'rm -rf "$W"' EXIT

# The fio disk is a qcow2 overlay (made by stratus-vmm's create_overlay, as a VM's root
# disk is) over a raw base of the same size (--disk path=/fio.qcow2,format=qcow2). In L1,
# `qemu-img check` must pass on it after the VMM exits, the base must be untouched, and
# `qemu-img convert -O raw` flattens it into /fio.img for the fio and dd checks.
# FIO_DISK_FORMAT=raw runs the same checks on a plain raw file instead.
FIO_DISK_FORMAT=${FIO_DISK_FORMAT:-qcow2}

# The fio disk: fio's verified random writes in [0, FIO_SIZE_MIB), the dd file at
# DD_OFFSET_MIB, zeros everywhere else.
FIO_SERIAL=stratus-fio-1
FIO_DISK_MIB=64
FIO_SIZE_MIB=32
DD_OFFSET_MIB=48
head -c 1M /dev/urandom > "$W/dd-payload"
truncate -s $((FIO_DISK_MIB - FIO_SIZE_MIB))M "$W/expected-tail.img"
dd if="$W/dd-payload" of="$W/expected-tail.img" bs=1M seek=$((DD_OFFSET_MIB - FIO_SIZE_MIB)) conv=notrunc status=none
EXPECTED_TAIL_SHA=$(sha256sum "$W/expected-tail.img" | cut -d' ' -f1)
# One job file for both sides; the engine, O_DIRECT and the target come from the environment.
cat > "$W/fio-verify.job" <<JOB
[global]
filename=\${FIO_FILE}
ioengine=\${FIO_ENGINE}
direct=\${FIO_DIRECT}
iodepth=32
rw=randwrite
bsrange=4k-64k
size=${FIO_SIZE_MIB}m
randrepeat=1
randseed=20261126
verify=crc32c
verify_fatal=1
[stratus-verify]
JOB
# What a fio terse (v3) line says: field 5 is the error, 6 KiB read (verified), 47 KiB
# written (--verify_only counts the writes it skips there too, so L1 leaves it out).
# shellcheck disable=SC2016
FIO_SUMMARY='/^3;/ {print "err=" $5, "written_kib=" $47, "verified_kib=" $6}'
# shellcheck disable=SC2016
FIO_VERIFY_SUMMARY='/^3;/ {print "err=" $5, "verified_kib=" $6}'
FIO_KIB=$((FIO_SIZE_MIB * 1024))

# The data disk: a marker in sector 0, zeros elsewhere; the guest writes PATTERN at 4 KiB.
SERIAL=stratus-data-1
MARKER=STRATUS-DISK-MARKER-7f3a
head -c 65536 /dev/urandom > "$W/pattern"
truncate -s 1M "$W/data.img"
printf '%s' "$MARKER" | dd of="$W/data.img" conv=notrunc status=none
cp "$W/data.img" "$W/expected.img"
dd if="$W/pattern" of="$W/expected.img" bs=4096 seek=1 conv=notrunc status=none
EXPECTED_SHA=$(sha256sum "$W/expected.img" | cut -d' ' -f1)

# Context disks, written by stratus-contextualizer.
CONTEXT_DISK=$REPO_ROOT/target/debug/examples/context_disk
PUBKEY="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIStratusNestedTestKey user@stratus"
HOSTILE='it is "quoted" $(echo not-run) `id`'
"$CONTEXT_DISK" one "$W/ctx.iso" vm-42 nested-guest "$PUBKEY" WEBSITE=https://example.org "MESSAGE=$HOSTILE"
"$CONTEXT_DISK" nocloud "$W/nocloud.iso" vm-42 nested-guest "$PUBKEY"

# Inner (L2) initramfs.
busybox_root "$W/inner"
copy_modules "$W/inner/lib/modules" virtio_pci virtio_blk virtio_net pvpanic_mmio isofs button evdev
GUEST_MAC=02:00:c6:12:00:0a
GUEST_IP=198.18.0.10
# The third guest's hot-plugged NIC: the pool's second fixed address and its MAC.
HOT_IP=198.18.0.11
HOT_MAC=02:00:c6:12:00:0b
HOST_IP=198.18.0.1
head -c 200000 /dev/urandom > "$W/l1file"
L1FILE_SHA=$(sha256sum "$W/l1file" | cut -d' ' -f1)
PATTERN_SHA=$(sha256sum "$W/pattern" | cut -d' ' -f1)
cat > "$W/inner/udhcpc.sh" <<'SCRIPT'
#!/bin/sh
case "$1" in
bound|renew) ip addr add "$ip/$mask" dev "$interface"; echo "STRATUS-LEASE $ip router=$router"
    echo "STRATUS-DHCP-OPTIONS hostname=$hostname dns=$dns domain=$domain" ;;
esac
SCRIPT
chmod +x "$W/inner/udhcpc.sh"
cp "$W/pattern" "$W/inner/pattern"
copy_fio_into "$W/inner"
cp "$W/fio-verify.job" "$W/inner/"
cp "$W/dd-payload" "$W/inner/"
write_init "$W/inner" <<INIT
if grep -q stratus_test=live /proc/cmdline; then
    echo "STRATUS3-INIT"
    # The power button: the stock button driver turns the ACPI notification into a key
    # press on its "Power Button" input device (evdev); this init powers off on it.
    pb=
    for e in /sys/class/input/event*; do
        [ "\$(cat \$e/device/name 2>/dev/null)" = "Power Button" ] && pb=/dev/input/\${e##*/}
    done
    echo "STRATUS3-POWER-BUTTON-DEVICE \$pb"
    ( [ -c "\$pb" ] && dd if=\$pb bs=24 count=1 of=/dev/null 2>/dev/null &&
        echo "STRATUS3-POWER-BUTTON-PRESSED" && sync && poweroff -f ) &
    ( while :; do echo "STRATUS3-TICK"; sleep 1; done ) &
    echo "STRATUS3-READY"
    dev=; i=0
    while [ -z "\$dev" ] && [ \$i -lt 600 ]; do
        for b in /sys/block/vd?; do
            [ -e "\$b/serial" ] && [ "\$(cat "\$b/serial")" = hot-disk-1 ] && dev=\${b##*/}
        done
        sleep 0.2; i=\$((i+1))
    done
    echo "STRATUS3-HOT-DISK \$dev \$(cat /sys/block/\$dev/size 2>/dev/null)"
    dd if=/pattern of=/dev/\$dev bs=4096 seek=2 conv=fsync 2>/dev/null && echo "STRATUS3-HOT-WROTE"
    i=0; while [ -e /sys/block/\$dev ] && [ \$i -lt 600 ]; do sleep 0.2; i=\$((i+1)); done
    [ -e /sys/block/\$dev ] || echo "STRATUS3-HOT-DISK-GONE"
    i=0; while [ ! -e /sys/class/net/eth0 ] && [ \$i -lt 600 ]; do sleep 0.2; i=\$((i+1)); done
    echo "STRATUS3-HOT-NIC \$(cat /sys/class/net/eth0/address 2>/dev/null)"
    ip link set eth0 up
    udhcpc -i eth0 -q -n -t 10 -s /udhcpc.sh
    echo "STRATUS3-NIC-DONE"
    wait
fi
if grep -q stratus_test=panic /proc/cmdline; then
    echo "STRATUS2-INIT nproc=\$(nproc)"
    i=0; while [ ! -b /dev/vda ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i+1)); done
    [ "\$(cat /sys/block/vda/ro)" = 1 ] && echo "STRATUS2-RO-FLAG"
    dd if=/pattern of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null || echo "STRATUS2-WRITE-REFUSED"
    echo c > /proc/sysrq-trigger
    echo "STRATUS2-STILL-ALIVE"
    poweroff -f
fi
echo "STRATUS-INIT"
echo "STRATUS-NPROC \$(nproc)"
i=0; while [ ! -b /dev/vda ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i+1)); done
echo "STRATUS-SERIAL \$(cat /sys/block/vda/serial 2>/dev/null)"
[ "\$(dd if=/dev/vda bs=${#MARKER} count=1 2>/dev/null)" = "$MARKER" ] && echo "STRATUS-MARKER-OK"
dd if=/pattern of=/dev/vda bs=4096 seek=1 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=4096 skip=1 count=16 2>/dev/null | cmp -s - /pattern && echo "STRATUS-PATTERN-OK"
echo "STRATUS-MQ \$(ls /sys/block/vda/mq | wc -l)"
blkdiscard -o 524288 -l 65536 /dev/vda && echo "STRATUS-DISCARD-OK"
# The volume label, as blkid reads it: the ISO 9660 primary descriptor's volume id.
label() { dd if=\$1 bs=1 skip=32808 count=32 2>/dev/null | tr -d ' '; }
for d in /dev/vd?; do
    case \$(label \$d) in _STRATUSLAB) ctx=\$d ;; cidata) nocloud=\$d ;; esac
done
echo "STRATUS-CTX-DEVICES \$ctx \$nocloud"
mkdir -p /mnt/ctx /mnt/nc
if mount -t iso9660 -o ro "\$ctx" /mnt/ctx; then
    ( . /mnt/ctx/context.sh; echo "STRATUS-CTX-KEY \$PUBLIC_KEY"; echo "STRATUS-CTX-WEBSITE \$WEBSITE"; echo "STRATUS-CTX-MESSAGE \$MESSAGE" )
    ls /mnt/ctx | tr '\n' ' ' | sed 's/^/STRATUS-CTX-FILES /'; echo
fi
if mount -t iso9660 -o ro "\$nocloud" /mnt/nc; then
    echo "STRATUS-NOCLOUD \$(grep instance-id /mnt/nc/meta-data) \$(grep local-hostname /mnt/nc/meta-data)"
    grep -q "\$(echo '$PUBKEY' | cut -d' ' -f2)" /mnt/nc/user-data && echo "STRATUS-NOCLOUD-KEY-OK"
fi
fiodev=
for b in /sys/block/vd*; do [ "\$(cat \$b/serial 2>/dev/null)" = $FIO_SERIAL ] && fiodev=/dev/\${b##*/}; done
echo "STRATUS-FIO-DISK \$(cat /sys/block/\${fiodev#/dev/}/size 2>/dev/null) sectors"
if [ -b "\$fiodev" ]; then
    FIO_FILE=\$fiodev FIO_ENGINE=io_uring FIO_DIRECT=1 fio --output-format=terse /fio-verify.job > /fio.out 2>&1
    rc=\$?
    echo "STRATUS-FIO rc=\$rc \$(awk -F';' '$FIO_SUMMARY' /fio.out)"
    [ \$rc = 0 ] || sed 's/^/STRATUS-FIO-LOG /' /fio.out
    dd if=/dd-payload of=\$fiodev bs=65536 seek=$((DD_OFFSET_MIB * 16)) oflag=direct 2>/dev/null && echo "STRATUS-DD-DIRECT-OK"
fi
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -q -n -t 10 -s /udhcpc.sh
echo "STRATUS-MAC \$(cat /sys/class/net/eth0/address)"
echo "STRATUS-NICS \$(cat /sys/class/net/eth0/address) \$(cat /sys/class/net/eth1/address 2>/dev/null)"
echo "STRATUS-NET-QUEUES \$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l) \$(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)"
ping -c 3 -W 5 $HOST_IP >/dev/null && echo "STRATUS-PING-OK"
wget -q -O /got http://$HOST_IP/l1file && echo "STRATUS-DOWNLOAD \$(sha256sum /got | cut -d' ' -f1)"
# The CMOS clock: rtc_cmos bound to it, and both the RTC and the system clock (set from it
# at boot) agree with L1's clock, read over HTTP between two readings of the guest's own.
echo "STRATUS-RTC-NAME \$(cut -d' ' -f1 /sys/class/rtc/rtc0/name 2>/dev/null)"
echo "STRATUS-CLOCKEVENT \$(cat /sys/devices/system/clockevents/clockevent0/current_device 2>/dev/null)"
rtc0=\$(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null); sys0=\$(date +%s)
l1now=\$(wget -q -O - http://$HOST_IP/cgi-bin/now)
rtc1=\$(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null); sys1=\$(date +%s)
echo "STRATUS-CLOCKS rtc=\$rtc0..\$rtc1 system=\$sys0..\$sys1 l1=\$l1now"
within() { [ -n "\$1" ] && [ -n "\$3" ] && [ "\$3" -ge \$((\$1 - 1)) ] && [ "\$3" -le \$((\$2 + 1)) ]; }
within "\$rtc0" "\$rtc1" "\$l1now" && echo "STRATUS-RTC-MATCHES-HOST"
within "\$sys0" "\$sys1" "\$l1now" && echo "STRATUS-DATE-MATCHES-HOST"
hwclock -r -u >/dev/null && echo "STRATUS-HWCLOCK-OK"
nc -w 5 $HOST_IP 5000 < /pattern && echo "STRATUS-UPLOAD-SENT"
# poweroff -f does not wait for TCP to drain the socket buffer.
sleep 2
echo "STRATUS-NETSTAT tx \$(cat /sys/class/net/eth0/statistics/tx_packets) \$(cat /sys/class/net/eth0/statistics/tx_bytes) rx \$(cat /sys/class/net/eth0/statistics/rx_packets)"
echo "STRATUS-DONE"
poweroff -f
INIT
pack_initramfs "$W/inner" "$W/inner.cpio.gz"

# Outer (L1) initramfs: KVM modules, the static VMM, the inner guest and its disk.
busybox_root "$W/outer"
copy_modules "$W/outer/lib/modules" kvm_amd tun bridge
cp "$STATIC_VMM" "$W/outer/vmm"
cp "$VMLINUX" "$W/outer/vmlinux"
cp "$BZIMAGE" "$W/outer/bzimage"
truncate -s 1M "$W/outer/ro.img"
cp "$W/inner.cpio.gz" "$W/outer/initrd"
cp "$W/data.img" "$W/outer/data.img"
cp "$W/ctx.iso" "$W/nocloud.iso" "$W/outer/"
copy_fio_into "$W/outer"
cp "$W/fio-verify.job" "$W/outer/"
case $FIO_DISK_FORMAT in
raw)
    truncate -s ${FIO_DISK_MIB}M "$W/outer/fio.img"
    FIO_DISK=path=/fio.img,serial=$FIO_SERIAL
    FIO_FLATTEN=: ;;
qcow2)
    command -v qemu-img >/dev/null || { log "FIO_DISK_FORMAT=qcow2 needs qemu-img (apt-get install qemu-utils)"; exit 1; }
    truncate -s ${FIO_DISK_MIB}M "$W/outer/fio-base.img"
    "$REPO_ROOT/target/debug/examples/create_overlay" "$W/outer/fio.qcow2" fio-base.img raw
    copy_binary_with_libs qemu-img "$W/outer"
    FIO_DISK=path=/fio.qcow2,format=qcow2,serial=$FIO_SERIAL
    BASE_SHA=$(sha256sum "$W/outer/fio-base.img" | cut -d' ' -f1)
    FIO_FLATTEN="qemu-img check -q /fio.qcow2 && echo L1-QCOW2-CHECK-OK
echo \"L1-QCOW2-BASE-SHA256 \$(sha256sum /fio-base.img | cut -d' ' -f1)\"
qemu-img convert -O raw /fio.qcow2 /fio.img" ;;
*) log "FIO_DISK_FORMAT must be raw or qcow2, not $FIO_DISK_FORMAT"; exit 1 ;;
esac
mkdir -p "$W/outer/www"; cp "$W/l1file" "$W/outer/www/l1file"
mkdir -p "$W/outer/www/cgi-bin"
printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\ndate +%%s\n' > "$W/outer/www/cgi-bin/now"
chmod +x "$W/outer/www/cgi-bin/now"
cp "$STATIC_DHCP_SERVER" "$W/outer/dhcp_server"
cp "$STATIC_API_CALL" "$W/outer/api_call"
cat > "$W/outer/pool.json" <<POOL
{"kind": "public", "subnet": "198.18.0.0/24", "gateway": "$HOST_IP",
 "dns_servers": ["198.18.0.2"], "domain": "nested.stratus.test",
 "addresses": {"fixed": [{"ip": "$GUEST_IP", "hostname": "nested-guest"},
                        {"ip": "$HOT_IP", "hostname": "nested-hot"}]}}
POOL
write_init "$W/outer" <<INIT
[ -c /dev/kvm ] && echo "L1-KVM-READY"
ip link set lo up
brctl addbr br0; ip addr add $HOST_IP/24 dev br0; ip link set br0 up
# tap0 is the VMM's own multiqueue TAP: bridged as soon as the VMM has made it.
( i=0; while ! ip link show tap0 >/dev/null 2>&1 && [ \$i -lt 600 ]; do sleep 0.1; i=\$((i+1)); done
  brctl addif br0 tap0; ip link set tap0 up ) &
tunctl -t tap1 >/dev/null; ip link set tap1 up
/dhcp_server br0 $HOST_IP /pool.json > /dhcp.log 2>&1 &
httpd -p 80 -h /www
# The listener's stdin must stay open (busybox nc hangs up when its stdin ends): a FIFO
# whose write end this shell holds.
mkfifo /nc-in
nc -l -p 5000 < /nc-in > /from_guest &
UPLOAD_PID=\$!
exec 3> /nc-in
/vmm --kernel /vmlinux --initrd /initrd --cpus 2 --memory 512 \
  --disk path=/data.img,serial=$SERIAL --disk path=/ctx.iso,ro=on --disk path=/nocloud.iso,ro=on \
  --disk $FIO_DISK \
  --net tap=tap0,mac=$GUEST_MAC,queues=2 --net tap=tap1,mac=02:00:c6:12:01:0a \
  --cmdline "console=ttyS0 reboot=k panic=-1 loglevel=4"
echo "VMM-EXIT rc=\$?"
echo "L1-DISK-SHA256 \$(sha256sum /data.img | cut -d' ' -f1)"
# The host side of the fio and dd checks, on the image file the VMM wrote.
$FIO_FLATTEN
FIO_FILE=/fio.img FIO_ENGINE=psync FIO_DIRECT=0 fio --verify_only --output-format=terse /fio-verify.job > /fio-host.out 2>&1
rc=\$?
echo "L1-FIO-VERIFY rc=\$rc \$(awk -F';' '$FIO_VERIFY_SUMMARY' /fio-host.out)"
[ \$rc = 0 ] || grep -v '^3;' /fio-host.out | sed 's/^/L1-FIO-LOG /'
echo "L1-FIO-DISK-TAIL-SHA256 \$(dd if=/fio.img bs=1M skip=$FIO_SIZE_MIB 2>/dev/null | sha256sum | cut -d' ' -f1)"
# The listener ends when the guest's upload does; bound the wait in case it never came.
i=0; while kill -0 \$UPLOAD_PID 2>/dev/null && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i+1)); done
kill \$UPLOAD_PID 2>/dev/null
exec 3>&-
sed 's/^/L1-DHCP-LOG /' /dhcp.log
echo "L1-UPLOAD \$(sha256sum /from_guest | cut -d' ' -f1) \$(wc -c < /from_guest) bytes"
/vmm --kernel /bzimage --initrd /initrd --cpus 1 --memory 256 \
  --disk path=/ro.img,ro=on,serial=ro-disk \
  --cmdline "console=ttyS0 panic=-1 loglevel=4 stratus_test=panic"
echo "VMM2-EXIT rc=\$?"
echo "L1-RO-DISK-SHA256 \$(sha256sum /ro.img | cut -d' ' -f1)"
# Third guest: live control through the VMM's API (hot-plug, pause, power button).
truncate -s 1M /hot.img
: > /con3.log
tunctl -t tap5 >/dev/null; brctl addif br0 tap5; ip link set tap5 up
STRATUS_LOG=info /vmm --kernel /vmlinux --initrd /initrd --cpus 1 --memory 256 --api-socket /api.sock \
  --console file=/con3.log --cmdline "console=ttyS0 reboot=k panic=-1 loglevel=4 stratus_test=live" \
  > /vmm3.out 2>&1 &
VMM3=\$!
# The guest's console as it comes (ticks left out), so a run that stops half-way still
# shows how far the guest got (all of it is printed again at the end).
tail -n +1 -f /con3.log 2>/dev/null | awk '!/STRATUS3-TICK/ { print "L1-CON3-LIVE " \$0; fflush() }' &
# Ticks of L1's own: if they stop too, L1 stalled, not the VMM.
( while :; do sleep 30; echo "L1-ALIVE \$(cut -d' ' -f1 /proc/uptime)"; done ) &
L1_ALIVE=\$!
waitcon() { i=0; while ! grep -q "\$1" /con3.log 2>/dev/null; do [ \$i -ge \$2 ] && return 1; sleep 1; i=\$((i+1)); done; }
# What each of the VMM's threads waits in, for an answer that never came.
vmm_threads() {
    for t in /proc/\$VMM3/task/*; do
        echo "L1-VMM3-THREAD \$(cat \$t/comm) state=\$(awk '/^State/ {print \$2}' \$t/status) wchan=\$(cat \$t/wchan 2>/dev/null)"
        sed 's/^/L1-VMM3-STACK   /' \$t/stack 2>/dev/null
    done
}
# Bounded: an API that stops answering fails this test's checks instead of holding L1
# until the harness's timeout, and leaves the VMM's threads on the console; the calls
# after it are not made.
api() {
    [ -e /api-hung ] && return 1
    timeout 60 /api_call /api.sock "\$@"; rc=\$?
    [ \$rc = 143 ] && { : > /api-hung; echo "L1-API-TIMEOUT \$*"; vmm_threads; tail -n 20 /vmm3.out; } >&2
    return \$rc
}
waitcon STRATUS3-READY 300 && echo "L1-LIVE-READY"
api PUT /vm/disks '{"id":"hot1","path":"/hot.img","serial":"hot-disk-1"}' | sed 's/^/L1-API-PUT-DISK /'
waitcon STRATUS3-HOT-WROTE 120
api GET /vm | grep -q '"id":"hot1".*"driver_ready":true' && echo "L1-HOT1-DRIVER-READY"
api DELETE /vm/disks/hot1 | sed 's/^/L1-API-DELETE-DISK /'
waitcon STRATUS3-HOT-DISK-GONE 120
i=0; while api GET /vm | grep -q '"hot1"' && [ \$i -lt 60 ]; do sleep 1; i=\$((i+1)); done
api GET /vm | grep -q '"hot1"' || echo "L1-HOT1-EJECTED"
echo "L1-HOT-SHA256 \$(dd if=/hot.img bs=4096 skip=2 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
api PUT /vm/nets '{"id":"hotnet","tap":"tap5","mac":"$HOT_MAC"}' | sed 's/^/L1-API-PUT-NET /'
waitcon STRATUS3-NIC-DONE 120
api GET /vm/counters | sed 's/^/L1-COUNTERS /'
api PUT /vm/actions '{"action":"pause"}' | sed 's/^/L1-API-PAUSE /'
t1=\$(grep -c STRATUS3-TICK /con3.log); sleep 5; t2=\$(grep -c STRATUS3-TICK /con3.log)
[ "\$t1" = "\$t2" ] && echo "L1-PAUSE-HELD \$t1"
api PUT /vm/actions '{"action":"resume"}' | sed 's/^/L1-API-RESUME /'
sleep 5; t3=\$(grep -c STRATUS3-TICK /con3.log)
[ "\$t3" -gt "\$t2" ] && echo "L1-RESUME-TICKS \$t2 \$t3"
api PUT /vm/actions '{"action":"shutdown"}' | sed 's/^/L1-API-SHUTDOWN /'
i=0; while kill -0 \$VMM3 2>/dev/null && [ \$i -lt 120 ]; do sleep 1; i=\$((i+1)); done
kill -0 \$VMM3 2>/dev/null && { echo "VMM3-STILL-RUNNING"; kill \$VMM3; }
wait \$VMM3; echo "VMM3-EXIT rc=\$?"
kill \$L1_ALIVE; killall tail 2>/dev/null
grep -v STRATUS3-TICK /con3.log | sed 's/^/L1-CON3 /'
sed 's/^/L1-VMM3 /' /vmm3.out
poweroff -f
INIT
pack_initramfs "$W/outer" "$W/outer.cpio.gz"

CONSOLE=$NESTED_WORK/boot_debian.console.log
log "booting L1 (console: $CONSOLE)"
start=$(date +%s)
run_l1 "$W/outer.cpio.gz" "$CONSOLE" "${NESTED_TIMEOUT:-900}" || true
log "L1 finished after $(( $(date +%s) - start )) s"

passed=0; failed=0
check() {
    local what=$1 needle=$2
    if grep -qF -- "$needle" "$CONSOLE"; then
        passed=$((passed + 1)); echo "ok   - $what"
    else
        failed=$((failed + 1)); echo "FAIL - $what (console lacks: $needle)"
    fi
}
check "L1 has /dev/kvm from the stock kvm_amd" "L1-KVM-READY"
check "guest reached /init" "STRATUS-INIT"
check "stock virtio modules loaded" "STRATUS-NPROC"
check "guest sees 2 vCPUs" "STRATUS-NPROC 2"
check "disk is /dev/vda with the configured serial" "STRATUS-SERIAL $SERIAL"
check "guest reads the host's marker from sector 0" "STRATUS-MARKER-OK"
check "guest reads back the pattern it wrote" "STRATUS-PATTERN-OK"
check "one request queue per vCPU" "STRATUS-MQ 2"
check "guest can discard" "STRATUS-DISCARD-OK"
check "guest powered off and the VMM exited 0" "VMM-EXIT rc=0"
check "disk file holds exactly the marker and the pattern" "L1-DISK-SHA256 $EXPECTED_SHA"
check "context CD and NoCloud disk found by label" "STRATUS-CTX-DEVICES /dev/vdb /dev/vdc"
check "fio disk found by its serial, $FIO_DISK_MIB MiB" "STRATUS-FIO-DISK $((FIO_DISK_MIB * 2048)) sectors"
check "guest fio: O_DIRECT io_uring QD32 random 4-64 KiB writes verified in the guest" \
    "STRATUS-FIO rc=0 err=0 written_kib=$FIO_KIB verified_kib=$FIO_KIB"
check "L1 re-verifies every fio block in the image (offset + crc32c)" \
    "L1-FIO-VERIFY rc=0 err=0 verified_kib=$FIO_KIB"
check "guest dd oflag=direct of the host's file completes" "STRATUS-DD-DIRECT-OK"
if [ "$FIO_DISK_FORMAT" = qcow2 ]; then
    check "qcow2 overlay passes qemu-img check after the VMM exits" "L1-QCOW2-CHECK-OK"
    check "the overlay's raw base is untouched" "L1-QCOW2-BASE-SHA256 $BASE_SHA"
fi
check "image holds the dd file at $DD_OFFSET_MIB MiB and zeros around it" "L1-FIO-DISK-TAIL-SHA256 $EXPECTED_TAIL_SHA"
check "context.sh gives the public key" "STRATUS-CTX-KEY $PUBKEY"
check "context.sh gives a user key" "STRATUS-CTX-WEBSITE https://example.org"
check "a hostile context value stays data" "STRATUS-CTX-MESSAGE $HOSTILE"
check "context CD holds the four scripts" "STRATUS-CTX-FILES context.sh epilog.sh init.sh prolog.sh"
check "NoCloud meta-data has instance id and hostname" 'STRATUS-NOCLOUD instance-id: "vm-42" local-hostname: "nested-guest"'
check "NoCloud user-data carries the key" "STRATUS-NOCLOUD-KEY-OK"
check "guest NIC has the configured MAC" "STRATUS-MAC $GUEST_MAC"
check "a second NIC is there with its own MAC" "STRATUS-NICS $GUEST_MAC 02:00:c6:12:01:0a"
check "the guest's driver uses both queue pairs of the first NIC" "STRATUS-NET-QUEUES 2 2"
check "guest gets its fixed address by DHCP" "STRATUS-LEASE $GUEST_IP router=$HOST_IP"
check "DHCP options from the pool reach the guest" "STRATUS-DHCP-OPTIONS hostname=nested-guest dns=198.18.0.2 domain=nested.stratus.test"
check "guest pings the L1 host" "STRATUS-PING-OK"
check "file from L1 arrives intact" "STRATUS-DOWNLOAD $L1FILE_SHA"
check "file from the guest arrives intact" "L1-UPLOAD $PATTERN_SHA"
check "the stock rtc_cmos driver binds to the CMOS clock" "STRATUS-RTC-NAME rtc_cmos"
check "the guest's timer runs in TSC-deadline mode (announced in CPUID)" "STRATUS-CLOCKEVENT lapic-deadline"
check "the guest's RTC reads L1's time within a second" "STRATUS-RTC-MATCHES-HOST"
check "the guest's date after boot matches L1's within a second" "STRATUS-DATE-MATCHES-HOST"
check "hwclock -r reads the RTC" "STRATUS-HWCLOCK-OK"
check "bzImage guest boots with 1 vCPU" "STRATUS2-INIT nproc=1"
check "read-only disk is read-only in the guest" "STRATUS2-RO-FLAG"
check "guest write to the read-only disk fails" "STRATUS2-WRITE-REFUSED"
check "guest panic ends the VMM with status 2" "VMM2-EXIT rc=2"
check "VMM reports the panic" "stratus-vmm: guest kernel panicked"
check "the stock pvpanic driver reported it" "guest reported a kernel panic through pvpanic"
check "read-only disk file is unchanged" "L1-RO-DISK-SHA256 $(head -c 1M /dev/zero | sha256sum | cut -d' ' -f1)"
check "live-control guest boots with the API socket" "L1-LIVE-READY"
check "the stock button driver gives the power button an input device" "STRATUS3-POWER-BUTTON-DEVICE /dev/input/event"
check "hot-plugging a disk is answered 201" "L1-API-PUT-DISK 201"
check "the hot-plugged disk appears in the guest with its serial (acpiphp)" "STRATUS3-HOT-DISK vda 2048"
check "the guest writes to the hot-plugged disk" "STRATUS3-HOT-WROTE"
check "GET /vm shows the guest's driver took the disk" "L1-HOT1-DRIVER-READY"
check "unplugging is answered 202" "L1-API-DELETE-DISK 202"
check "the guest sees the disk vanish after DELETE" "STRATUS3-HOT-DISK-GONE"
check "the VMM drops the disk once the guest ejected it" "L1-HOT1-EJECTED"
check "the guest's writes are in the host file after unplug" "L1-HOT-SHA256 $PATTERN_SHA"
check "hot-plugging a NIC is answered 201" "L1-API-PUT-NET 201"
check "the hot-plugged NIC appears with its MAC" "STRATUS3-HOT-NIC $HOT_MAC"
check "the hot-plugged NIC gets its DHCP lease" "STRATUS-LEASE $HOT_IP router=$HOST_IP"
check "the counters show the hot NIC's DHCP traffic" 'L1-COUNTERS 200 {"disks":{},"nets":{"hotnet":{"rx_frames":'
check "pause answered" 'L1-API-PAUSE 200 {"state":"paused"'
check "a paused guest's clock-driven output stops" "L1-PAUSE-HELD"
check "resume restarts it" "L1-RESUME-TICKS"
check "the power button is answered 202" "L1-API-SHUTDOWN 202"
check "the guest sees the power button press" "STRATUS3-POWER-BUTTON-PRESSED"
check "the guest powers off and the VMM exits 0" "VMM3-EXIT rc=0"
if grep -q "STRATUS2-STILL-ALIVE" "$CONSOLE"; then
    failed=$((failed + 1)); echo "FAIL - the guest survived its own panic"
fi
if grep -q "INSMOD-FAILED" "$CONSOLE"; then
    failed=$((failed + 1)); echo "FAIL - a module did not load:"; grep "INSMOD-FAILED" "$CONSOLE"
fi
if [ $failed -ne 0 ]; then
    echo "---- console (last 80 lines) ----"; tail -n 80 "$CONSOLE"
fi
echo "nested: $passed passed, $failed failed"
[ $failed -eq 0 ]
