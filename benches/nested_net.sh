#!/bin/bash
# virtio-net throughput and latency, guest <-> L1 host, on stratus-vmm and on QEMU-KVM
# (q35, virtio-net-pci, no vhost) with the same TAP on the same bridge, alternated in one
# QEMU-TCG L1 guest with nested SVM. The guest (stock Debian kernel, 2 vCPUs) pulls and then
# pushes SIZE bytes over TCP with busybox nc and pings L1; a static stratus-bench in L1
# times the guest's console markers. Only the ratios mean anything.
# usage: benches/nested_net.sh [runs-per-vmm] [MiB]   (prints a Markdown table)
set -euo pipefail
RUNS=${1:-3}
MIB=${2:-32}
cd "$(dirname "$0")/.."
source scripts/nested/lib.sh
prepare_bench

W=$(mktemp -d "$NESTED_WORK/netbench.XXXX")
trap 'rm -rf "$W"' EXIT
HOST_IP=198.18.0.1
GUEST_IP=198.18.0.10
MAC=02:00:c6:12:00:0a
BYTES=$((MIB << 20))

busybox_root "$W/inner"
copy_modules "$W/inner/lib/modules" virtio_pci virtio_net
write_init "$W/inner" <<INIT
ip link set lo up
ip addr add $GUEST_IP/24 dev eth0; ip link set eth0 up
ping -c 2 -W 5 $HOST_IP >/dev/null
echo NET-RX-START; nc $HOST_IP 5001 > /dev/null; echo NET-RX-END
echo NET-TX-START; head -c $BYTES /dev/zero | nc $HOST_IP 5002; echo NET-TX-END
echo "PING \$(ping -c 20 -i 0.2 $HOST_IP | tail -1)"
poweroff -f
INIT
pack_initramfs "$W/inner" "$W/inner.cpio.gz"

busybox_root "$W/outer"
copy_modules "$W/outer/lib/modules" kvm_amd tun bridge
cp "$STATIC_VMM" "$W/outer/vmm"; cp "$STATIC_BENCH" "$W/outer/bench"
cp "$VMLINUX" "$W/outer/vmlinux"; cp "$W/inner.cpio.gz" "$W/outer/initrd"
copy_qemu_into "$W/outer"
CMDLINE="console=ttyS0 reboot=k panic=-1 loglevel=4"
write_init "$W/outer" <<INIT
ip link set lo up
brctl addbr br0; ip addr add $HOST_IP/24 dev br0; ip link set br0 up
head -c $BYTES /dev/urandom > /payload
mkfifo /nc-in
# Each run gets a fresh TAP and fresh listeners, so no VMM inherits another's TAP state.
listeners() {
    ip link del tap0 2>/dev/null
    tunctl -t tap0 >/dev/null; brctl addif br0 tap0; ip link set tap0 up
    nc -l -p 5001 < /payload &
    nc -l -p 5002 < /nc-in > /dev/null &
}
stamp() {
    /bench stamp --timeout-s \${STAMP_TIMEOUT:-900} --capture \${CAPTURE:-PING} --marker rx0=NET-RX-START --marker rx1=NET-RX-END \
        --marker tx0=NET-TX-START --marker tx1=NET-TX-END -- "\$@"
}
exec 3<> /nc-in
if [ -n "${DEBUG_QEMU:-}" ]; then
  listeners
  STAMP_TIMEOUT=120 CAPTURE= stamp /usr/bin/qemu-system-x86_64 -M q35,accel=kvm -cpu host -smp 2 -m 512 -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel /vmlinux -initrd /initrd -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=$MAC,romfile= -append '$CMDLINE'
  poweroff -f
fi
for run in \$(seq 1 $RUNS); do
  listeners
  echo "RESULT qemu-q35 \$(stamp /usr/bin/qemu-system-x86_64 -M q35,accel=kvm -cpu host -smp 2 -m 512 -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel /vmlinux -initrd /initrd -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=$MAC,romfile= -append '$CMDLINE')"
  listeners
  echo "RESULT stratus-vmm \$(stamp /vmm --kernel /vmlinux --initrd /initrd --cpus 2 --memory 512 --net tap=tap0,mac=$MAC --cmdline '$CMDLINE')"
done
poweroff -f
INIT
pack_initramfs "$W/outer" "$W/outer.cpio.gz"

CONSOLE=$NESTED_WORK/nested_net.console.log
log "running $RUNS alternated runs per VMM in L1 (console: $CONSOLE)"
run_l1 "$W/outer.cpio.gz" "$CONSOLE" 3600
python3 - "$CONSOLE" "$MIB" <<'PY'
import json, re, statistics, sys
mib = int(sys.argv[2])
rows = {}
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("RESULT ") and "STAMP " in line:
        rows.setdefault(line.split()[1], []).append(json.loads(line.split("STAMP ", 1)[1]))
if "stratus-vmm" not in rows:
    sys.exit("no stratus-vmm results in the console log")
def stats(name):
    rx, tx, rtt = [], [], []
    for r in rows[name]:
        if None in (r.get("rx0"), r.get("rx1"), r.get("tx0"), r.get("tx1")):
            sys.exit(f"{name}: a transfer did not finish: {r}")
        rx.append(mib / ((r["rx1"] - r["rx0"]) / 1000))
        tx.append(mib / ((r["tx1"] - r["tx0"]) / 1000))
        m = re.search(r"= [0-9.]+/([0-9.]+)/", " ".join(r.get("captured", [])))
        if m:
            rtt.append(float(m.group(1)))
    return statistics.median(rx), statistics.median(tx), (statistics.median(rtt) if rtt else float("nan"))
base = stats("stratus-vmm")
print(f"| nested virtio-net, guest ↔ L1 over a bridged TAP, {mib} MiB TCP each way, medians of {len(rows['stratus-vmm'])} | L1 → guest | guest → L1 | ping RTT |")
print("|---|---|---|---|")
for name in ("stratus-vmm", "qemu-q35"):
    if name not in rows:
        print(f"| {name} | failed | failed | failed |"); continue
    rx, tx, rtt = stats(name)
    if name == "stratus-vmm":
        print(f"| {name} | {rx:.1f} MiB/s | {tx:.1f} MiB/s | {rtt:.2f} ms |")
    else:
        print(f"| {name} | {rx:.1f} MiB/s (stratus {base[0]/rx:.2f}×) | {tx:.1f} MiB/s (stratus {base[1]/tx:.2f}×) | {rtt:.2f} ms (stratus {rtt/base[2]:.2f}× lower) |")
PY
