#!/bin/bash
# Main job: build stratus-vmm and boot the demo guest: the current Debian kernel with a
# busybox initramfs, 2 vCPUs and a virtio-blk data disk.
# On a host with VT-x/AMD-V, stratus-vmm runs the guest directly on /dev/kvm. On a host
# whose /dev/kvm is PVM (no hardware virtualisation, stock kernels cannot boot there) it
# runs inside a QEMU-TCG L1 guest with nested SVM.
# DEMO_SHELL=1 gives an interactive shell in the guest (exit it to power off).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh scripts/runtime-packages.txt
NESTED_WORK=$PWD/target/demo
source scripts/nested/lib.sh

fetch_kernel
build_static_vmm
W=$NESTED_WORK/run; rm -rf "$W"; mkdir -p "$W"

truncate -s 64M "$W/data.img"
busybox_root "$W/guest"
copy_modules "$W/guest/lib/modules" virtio_pci virtio_blk pvpanic_mmio
write_init "$W/guest" <<'INIT'
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo
echo "=================================================================="
echo " Stratus demo guest on stratus-vmm"
echo " kernel:  $(uname -r)"
echo " vCPUs:   $(nproc)"
echo " memory:  $(awk '/MemTotal/{print $2/1024 " MiB"}' /proc/meminfo)"
echo " disk:    /dev/vda, $(( $(cat /sys/block/vda/size) / 2048 )) MiB, serial $(cat /sys/block/vda/serial)"
echo " PCI:     $(for d in /sys/bus/pci/devices/*; do printf '%s:%s ' $(cat $d/vendor) $(cat $d/device); done)"
echo "=================================================================="
if grep -q demo_shell /proc/cmdline; then
    setsid cttyhack sh
fi
poweroff -f
INIT
pack_initramfs "$W/guest" "$W/guest.cpio.gz"

CMDLINE="console=ttyS0 reboot=k panic=-1 loglevel=4${DEMO_SHELL:+ demo_shell}"
if grep -qwE 'vmx|svm' /proc/cpuinfo; then
    log "hardware virtualisation present: running stratus-vmm directly"
    exec "$STATIC_VMM" --kernel "$VMLINUX" --initrd "$W/guest.cpio.gz" --cpus 2 --memory 512 \
        --disk "path=$W/data.img,serial=demo-disk" --cmdline "$CMDLINE"
fi

log "no VT-x/AMD-V on this host (PVM /dev/kvm): running stratus-vmm in a QEMU-TCG L1 guest"
busybox_root "$W/l1"
copy_modules "$W/l1/lib/modules" kvm_amd
cp "$STATIC_VMM" "$W/l1/vmm"; cp "$VMLINUX" "$W/l1/vmlinux"; cp "$W/guest.cpio.gz" "$W/l1/initrd"
write_init "$W/l1" <<INIT
truncate -s 64M /data.img
setsid cttyhack /vmm --kernel /vmlinux --initrd /initrd --cpus 2 --memory 512 \
    --disk path=/data.img,serial=demo-disk --cmdline "$CMDLINE"
echo "stratus-vmm exited with status \$?"
poweroff -f
INIT
pack_initramfs "$W/l1" "$W/l1.cpio.gz"
exec qemu-system-x86_64 -M microvm -accel tcg -cpu max -smp 1 -m 3072 -display none \
    -serial stdio -monitor none -no-reboot -kernel "$VMLINUX" -initrd "$W/l1.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet tsc_early_khz=$(host_tsc_khz)"
