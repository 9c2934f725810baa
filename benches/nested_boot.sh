#!/bin/bash
# Boot time of the same stock Debian kernel + busybox initramfs (2 vCPUs, 512 MiB, 8 MiB
# virtio-blk disk) on stratus-vmm and on QEMU-KVM (q35 and microvm), alternated in one
# QEMU-TCG L1 guest with nested SVM. Times are taken inside L1 by a static stratus-bench
# that watches each VMM's console: process start -> "Linux version" (kernel start) ->
# "STRATUS-INIT" (/init) -> exit after power-off. Only ratios mean anything here.
# usage: benches/nested_boot.sh [runs-per-vmm]   (prints a Markdown table)
set -euo pipefail
RUNS=${1:-3}
cd "$(dirname "$0")/.."
source scripts/nested/lib.sh
prepare_bench

W=$(mktemp -d "$NESTED_WORK/bench.XXXX")
trap 'rm -rf "$W"' EXIT

busybox_root "$W/inner"
cat > "$W/inner/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox echo STRATUS-INIT
/bin/busybox poweroff -f
INIT
chmod +x "$W/inner/init"
pack_initramfs "$W/inner" "$W/inner.cpio.gz"

busybox_root "$W/outer"
copy_modules "$W/outer/lib/modules" kvm_amd
cp "$STATIC_VMM" "$W/outer/vmm"; cp "$STATIC_BENCH" "$W/outer/bench"
cp "$VMLINUX" "$W/outer/vmlinux"; cp "$W/inner.cpio.gz" "$W/outer/initrd"
copy_qemu_into "$W/outer"

CMDLINE="console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 loglevel=6"
DISKS_Q35="-drive file=/disk.img,format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0"
DISKS_MICRO="-drive file=/disk.img,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0"
QCOMMON="-cpu host -smp 2 -m 512 -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel /vmlinux -initrd /initrd"
write_init "$W/outer" <<INIT
truncate -s 8M /disk.img
stamp() { /bench stamp --timeout-s 300 --marker kernel="Linux version" --marker init=STRATUS-INIT -- "\$@"; }
for run in \$(seq 1 $RUNS); do
  echo "RESULT stratus-vmm \$(stamp /vmm --kernel /vmlinux --initrd /initrd --cpus 2 --memory 512 --disk path=/disk.img --cmdline '$CMDLINE')"
  echo "RESULT qemu-q35 \$(stamp /usr/bin/qemu-system-x86_64 -M q35,accel=kvm $QCOMMON $DISKS_Q35 -append '$CMDLINE')"
  echo "RESULT qemu-microvm \$(stamp /usr/bin/qemu-system-x86_64 -M microvm,accel=kvm,x-option-roms=off,rtc=off $QCOMMON $DISKS_MICRO -append '$CMDLINE')"
done
poweroff -f
INIT
pack_initramfs "$W/outer" "$W/outer.cpio.gz"

CONSOLE=$NESTED_WORK/nested_boot.console.log
log "running $RUNS alternated boots per VMM in L1 (console: $CONSOLE)"
run_l1 "$W/outer.cpio.gz" "$CONSOLE" 3600
python3 - "$CONSOLE" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("RESULT ") and "STAMP " in line:
        name = line.split()[1]
        rows.setdefault(name, []).append(json.loads(line.split("STAMP ", 1)[1]))
if "stratus-vmm" not in rows:
    sys.exit("no stratus-vmm results in the console log")
def med(name, key):
    vals = [r[key] for r in rows[name] if r.get(key) is not None]
    if len(vals) != len(rows[name]):
        sys.exit(f"{name}: {key} missing in some runs: {rows[name]}")
    return statistics.median(vals)
print(f"| nested boot, Debian {''} kernel, 2 vCPUs / 512 MiB, medians of {len(rows['stratus-vmm'])} (L1 ms) | kernel start | /init | exit after power-off |")
print("|---|---|---|---|")
base = {k: med("stratus-vmm", k) for k in ("kernel", "init", "exit")}
for name in ("stratus-vmm", "qemu-q35", "qemu-microvm"):
    if name not in rows:
        print(f"| {name} | failed | failed | failed |"); continue
    cells = []
    for k in ("kernel", "init", "exit"):
        v = med(name, k)
        cells.append(f"{v:.0f} ms" + ("" if name == "stratus-vmm" else f" ({v / base[k]:.2f}×)"))
    print(f"| {name} | " + " | ".join(cells) + " |")
PY
