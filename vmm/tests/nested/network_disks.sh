#!/bin/bash
# Network and host-device disks under real Linux, in the nested harness (QEMU-TCG L1 with
# nested SVM). In L1, Debian's tgtd serves a thin-provisioned file-backed LUN on L1's
# loopback, and L1 has a virtio disk of its own (/dev/vda, a host block device there).
# A throw-away Ceph cluster (scripts/ceph-cluster.sh) runs on this host in a network
# namespace whose TAP is L1's NIC (198.18.72.1 here, 198.18.72.2 in L1).
# stratus-vmm boots the stock Debian kernel with all three as disks: the LUN through
# libiscsi (--disk iscsi://127.0.0.1/...), the block device by path (--disk path=/dev/vda,
# sized with BLKGETSIZE64 — its file metadata says 0 bytes), an RBD image through librbd
# (--disk rbd:rbd/IMAGE,...: the VMM is the dynamically linked debug build here, with
# librbd and its libraries copied into L1, as a static VMM cannot load librbd).
# In the guest, fio (O_DIRECT, io_uring, QD32, random 4-64 KiB writes with crc32c verify
# headers) writes and verifies each disk, and blkdiscard/blkzeroout run on each. After the
# VMM exits, fio in L1 re-verifies the LUN's backing file and the block device
# (--verify_only), fio here re-verifies the image as `rbd export` reads it, and the
# discarded and zeroed ranges are read back as zeros in all three.
# Prints "network-disks: N passed, M failed" and exits non-zero on any failure.
set -euo pipefail
source "$(dirname "$0")/../../../scripts/nested/lib.sh"

command -v tgtd >/dev/null || { log "tgtd not found (apt-get install tgt)"; exit 1; }
command -v ceph-osd >/dev/null || { log "ceph-osd not found (apt-get install ceph-osd ceph-mon ceph-common)"; exit 1; }
fetch_kernel
build_workspace_debug
DYNAMIC_VMM=$REPO_ROOT/target/debug/stratus-vmm

W=$(mktemp -d "$NESTED_WORK/netdisks.XXXX")
NETNS=stratus-netdisks-$$
CEPH_ADDR=198.18.72.1
L1_ADDR=198.18.72.2
cleanup() {
    "$REPO_ROOT/scripts/ceph-cluster.sh" stop "$W/ceph" > /dev/null 2>&1 || true
    ip netns del "$NETNS" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

DISK_MIB=48
FIO_MIB=24
# Ranges the guest discards (blkdiscard) and zeroes (blkzeroout) after fio, past fio's area.
DISCARD_OFF_MIB=32
ZERO_OFF_MIB=40
IQN=iqn.2026-12.eu.stratuslab.nested:lun1
cat > "$W/fio-verify.job" <<JOB
[global]
filename=\${FIO_FILE}
ioengine=\${FIO_ENGINE}
direct=\${FIO_DIRECT}
iodepth=32
rw=randwrite
bsrange=4k-64k
size=${FIO_MIB}m
randrepeat=1
randseed=20261201
verify=crc32c
verify_fatal=1
[stratus-verify]
JOB
# shellcheck disable=SC2016
FIO_SUMMARY='/^3;/ {print "err=" $5, "written_kib=" $47, "verified_kib=" $6}'
# shellcheck disable=SC2016
FIO_VERIFY_SUMMARY='/^3;/ {print "err=" $5, "verified_kib=" $6}'
FIO_KIB=$((FIO_MIB * 1024))
ONES_MIB_SHA=$(head -c 1M /dev/zero | tr '\0' '\377' | sha256sum | cut -d' ' -f1)
ZERO_MIB_SHA=$(head -c 1M /dev/zero | sha256sum | cut -d' ' -f1)

# The guest (L2).
busybox_root "$W/inner"
copy_modules "$W/inner/lib/modules" virtio_pci virtio_blk
copy_fio_into "$W/inner"
# util-linux's blkdiscard (busybox's has no -z, the zero-out).
copy_binary_with_libs blkdiscard "$W/inner"
cp "$W/fio-verify.job" "$W/inner/"
write_init "$W/inner" <<INIT
echo "NETDISK-INIT"
i=0; while [ ! -b /dev/vdc ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i+1)); done
for b in /sys/block/vd?; do
    serial=\$(cat \$b/serial 2>/dev/null); dev=/dev/\${b##*/}
    echo "NETDISK-\$serial size=\$(cat \$b/size) discard_max=\$(cat \$b/queue/discard_max_bytes)"
    FIO_FILE=\$dev FIO_ENGINE=io_uring FIO_DIRECT=1 fio --output-format=terse /fio-verify.job > /fio.out 2>&1
    rc=\$?
    echo "NETDISK-\$serial-FIO rc=\$rc \$(awk -F';' '$FIO_SUMMARY' /fio.out)"
    [ \$rc = 0 ] || sed "s/^/NETDISK-\$serial-FIO-LOG /" /fio.out
    /usr/bin/blkdiscard -o $((DISCARD_OFF_MIB << 20)) -l 1048576 \$dev && echo "NETDISK-\$serial-DISCARD-OK"
    /usr/bin/blkdiscard -z -o $((ZERO_OFF_MIB << 20)) -l 1048576 \$dev && echo "NETDISK-\$serial-ZEROOUT-OK"
    sync
done
echo "NETDISK-DONE"
poweroff -f
INIT
pack_initramfs "$W/inner" "$W/inner.cpio.gz"

# The cluster and its image, filled with 0xff like the other disks.
ceph_behind_l1 "$NETNS" "$CEPH_ADDR" "$W/ceph"
in_netns() { ip netns exec "$NETNS" "$@"; }
CEPH_CONF=$W/ceph/ceph.conf
head -c ${DISK_MIB}M /dev/zero | tr '\0' '\377' > "$W/rbd-before.img"
in_netns rbd -c "$CEPH_CONF" import --no-progress "$W/rbd-before.img" rbd/nested

# L1: tgtd with its libraries, the VMM with librbd, fio for the re-verification, a
# client's ceph.conf (the monitors, the key) for the cluster behind its NIC.
busybox_root "$W/outer"
copy_modules "$W/outer/lib/modules" kvm_amd tun virtio_mmio virtio_blk virtio_net
# fio first: its stand-ins for the RDMA libraries are then replaced by the real ones,
# which tgtd's iSER transport calls at start-up.
copy_fio_into "$W/outer"
copy_tgtd_into "$W/outer"
cp "$W/fio-verify.job" "$W/outer/"
copy_binary_with_libs "$DYNAMIC_VMM" "$W/outer"
copy_librbd_into "$W/outer"
copy_ceph_client_into "$W/outer" "$W/ceph"
cp "$VMLINUX" "$W/outer/vmlinux"
cp "$W/inner.cpio.gz" "$W/outer/initrd"
# L1's own disk, filled with 0xff so discarded and zeroed ranges are visible.
head -c ${DISK_MIB}M /dev/zero | tr '\0' '\377' > "$W/l1disk.img"
write_init "$W/outer" <<INIT
[ -c /dev/kvm ] && echo "L1-KVM-READY"
ip link set lo up
ip addr add $L1_ADDR/24 dev eth0 && ip link set eth0 up && echo "L1-NIC-READY"
head -c $((DISK_MIB << 20)) /dev/zero | tr '\0' '\377' > /lun.img
$(tgtd_l1_script $IQN /lun.img thin) && echo "L1-TARGET-READY"
echo "L1-VDA-BYTES \$(blockdev --getsize64 /dev/vda 2>/dev/null) file-says \$(stat -c %s /dev/vda)"
stratus-vmm --kernel /vmlinux --initrd /initrd --cpus 2 --memory 512 \
  --disk iscsi://127.0.0.1:3260/$IQN/1,serial=iscsi-lun \
  --disk path=/dev/vda,serial=host-blockdev,cache=none \
  --disk rbd:rbd/nested,conf=/ceph/ceph.conf,id=stratus,keyring=/ceph/client.stratus.keyring,serial=rbd-image \
  --cmdline "console=ttyS0 reboot=k panic=-1 loglevel=4"
echo "VMM-EXIT rc=\$?"
for target in lun:/lun.img blockdev:/dev/vda; do
    name=\${target%%:*}; file=\${target#*:}
    FIO_FILE=\$file FIO_ENGINE=psync FIO_DIRECT=0 fio --verify_only --output-format=terse /fio-verify.job > /fio-host.out 2>&1
    rc=\$?
    echo "L1-\$name-FIO-VERIFY rc=\$rc \$(awk -F';' '$FIO_VERIFY_SUMMARY' /fio-host.out)"
    [ \$rc = 0 ] || sed "s/^/L1-\$name-FIO-LOG /" /fio-host.out
    echo "L1-\$name-DISCARDED \$(dd if=\$file bs=1M skip=$DISCARD_OFF_MIB count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
    echo "L1-\$name-ZEROED \$(dd if=\$file bs=1M skip=$ZERO_OFF_MIB count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
    echo "L1-\$name-UNTOUCHED \$(dd if=\$file bs=1M skip=$((DISK_MIB - 1)) count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
done
grep -i error /tgtd.log | sed 's/^/L1-TGTD /'
poweroff -f
INIT
pack_initramfs "$W/outer" "$W/outer.cpio.gz"

CONSOLE=$NESTED_WORK/network_disks.console.log
NESTED_QEMU_ARGS=(-drive "file=$W/l1disk.img,if=none,format=raw,id=l1disk,cache=unsafe,discard=unmap"
    -device virtio-blk-device,drive=l1disk
    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=n0)
log "booting L1 (console: $CONSOLE)"
start=$(date +%s)
NESTED_QEMU_NETNS=$NETNS NESTED_SILENT_S=180 run_l1 "$W/outer.cpio.gz" "$CONSOLE" "${NESTED_TIMEOUT:-900}" || true
log "L1 finished after $(( $(date +%s) - start )) s"

# The image as the cluster has it now, checked here like L1 checks its two disks.
{
    if in_netns rbd -c "$CEPH_CONF" export --no-progress rbd/nested "$W/rbd-after.img" >/dev/null 2>&1; then
        FIO_FILE=$W/rbd-after.img FIO_ENGINE=psync FIO_DIRECT=0 fio --verify_only --verify_state_save=0 --output-format=terse "$W/fio-verify.job" > "$W/fio-rbd.out" 2>&1
        rc=$?
        echo "HOST-rbd-FIO-VERIFY rc=$rc $(awk -F';' "$FIO_VERIFY_SUMMARY" "$W/fio-rbd.out")"
        [ $rc = 0 ] || sed "s/^/HOST-rbd-FIO-LOG /" "$W/fio-rbd.out"
        echo "HOST-rbd-DISCARDED $(dd if="$W/rbd-after.img" bs=1M skip=$DISCARD_OFF_MIB count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
        echo "HOST-rbd-ZEROED $(dd if="$W/rbd-after.img" bs=1M skip=$ZERO_OFF_MIB count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
        echo "HOST-rbd-UNTOUCHED $(dd if="$W/rbd-after.img" bs=1M skip=$((DISK_MIB - 1)) count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
    else
        echo "HOST-rbd-EXPORT-FAILED"
    fi
} >> "$CONSOLE"

passed=0; failed=0
check() {
    local what=$1 needle=$2
    if grep -qF -- "$needle" "$CONSOLE"; then
        passed=$((passed + 1)); echo "ok   - $what"
    else
        failed=$((failed + 1)); echo "FAIL - $what (console lacks: $needle)"
    fi
}
SECTORS=$((DISK_MIB * 2048))
check "L1 has /dev/kvm" "L1-KVM-READY"
check "L1's NIC is up on the cluster's TAP" "L1-NIC-READY"
check "tgtd serves a thin LUN in L1" "L1-TARGET-READY"
check "L1's /dev/vda is a block device its file metadata calls empty" "L1-VDA-BYTES $((DISK_MIB << 20)) file-says 0"
check "guest reached /init" "NETDISK-INIT"
check "the iSCSI LUN is a $DISK_MIB MiB disk with discard" "NETDISK-iscsi-lun size=$SECTORS discard_max="
check "the host block device is a $DISK_MIB MiB disk (BLKGETSIZE64)" "NETDISK-host-blockdev size=$SECTORS"
check "the RBD image is a $DISK_MIB MiB disk with discard" "NETDISK-rbd-image size=$SECTORS discard_max="
check "guest fio verifies its writes on the iSCSI disk" \
    "NETDISK-iscsi-lun-FIO rc=0 err=0 written_kib=$FIO_KIB verified_kib=$FIO_KIB"
check "guest fio verifies its writes on the block device" \
    "NETDISK-host-blockdev-FIO rc=0 err=0 written_kib=$FIO_KIB verified_kib=$FIO_KIB"
check "guest fio verifies its writes on the RBD disk" \
    "NETDISK-rbd-image-FIO rc=0 err=0 written_kib=$FIO_KIB verified_kib=$FIO_KIB"
check "blkdiscard on the iSCSI disk (UNMAP)" "NETDISK-iscsi-lun-DISCARD-OK"
check "blkzeroout on the iSCSI disk (WRITE SAME)" "NETDISK-iscsi-lun-ZEROOUT-OK"
check "blkdiscard on the block device" "NETDISK-host-blockdev-DISCARD-OK"
check "blkzeroout on the block device" "NETDISK-host-blockdev-ZEROOUT-OK"
check "blkdiscard on the RBD disk" "NETDISK-rbd-image-DISCARD-OK"
check "blkzeroout on the RBD disk" "NETDISK-rbd-image-ZEROOUT-OK"
check "guest powered off, VMM exited 0" "VMM-EXIT rc=0"
check "L1 re-verifies every fio block in the LUN's backing file" "L1-lun-FIO-VERIFY rc=0 err=0 verified_kib=$FIO_KIB"
check "L1 re-verifies every fio block on the block device" "L1-blockdev-FIO-VERIFY rc=0 err=0 verified_kib=$FIO_KIB"
check "the discarded range of the LUN reads as zeros" "L1-lun-DISCARDED $ZERO_MIB_SHA"
check "the zeroed range of the LUN reads as zeros" "L1-lun-ZEROED $ZERO_MIB_SHA"
check "the discard reached L1's disk (QEMU's discard=unmap punched the hole: zeros)" "L1-blockdev-DISCARDED $ZERO_MIB_SHA"
check "the zeroed range of the block device reads as zeros" "L1-blockdev-ZEROED $ZERO_MIB_SHA"
check "the LUN's last MiB is untouched" "L1-lun-UNTOUCHED $ONES_MIB_SHA"
check "the block device's last MiB is untouched" "L1-blockdev-UNTOUCHED $ONES_MIB_SHA"
check "fio here re-verifies every fio block in the RBD image (rbd export)" "HOST-rbd-FIO-VERIFY rc=0 err=0 verified_kib=$FIO_KIB"
check "the discarded range of the RBD image reads as zeros" "HOST-rbd-DISCARDED $ZERO_MIB_SHA"
check "the zeroed range of the RBD image reads as zeros" "HOST-rbd-ZEROED $ZERO_MIB_SHA"
check "the RBD image's last MiB is untouched" "HOST-rbd-UNTOUCHED $ONES_MIB_SHA"
if grep -q "INSMOD-FAILED" "$CONSOLE"; then
    failed=$((failed + 1)); echo "FAIL - a module did not load:"; grep "INSMOD-FAILED" "$CONSOLE"
fi
if [ $failed -ne 0 ]; then
    echo "---- console (last 60 lines) ----"; tail -n 60 "$CONSOLE"
fi
echo "network-disks: $passed passed, $failed failed"
[ $failed -eq 0 ]
