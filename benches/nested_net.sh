#!/bin/bash
# virtio-net throughput and latency, guest <-> L1 host, on stratus-vmm and on QEMU-KVM
# (q35, virtio-net-pci, no vhost) with the same TAP on the same bridge, alternated in one
# QEMU-TCG L1 guest with nested SVM. The guest (stock Debian kernel, 2 vCPUs) runs, with one
# queue pair: busybox nc pulling and then pushing SIZE bytes over TCP (timed by a static
# stratus-bench in L1 that watches the guest's console markers); then, with one queue pair
# and again with two (a multiqueue TAP, one pair per vCPU, one iperf3 stream per pair):
# Debian's iperf3 against an iperf3 server in L1, each way for SECS seconds; then 20 pings.
# The guest also prints its NIC's interrupt counts around each iperf3 run. Only the ratios
# mean anything: everything runs under TCG.
# usage: benches/nested_net.sh [runs-per-vmm] [MiB] [iperf3-seconds]   (prints Markdown tables)
set -euo pipefail
RUNS=${1:-3}
MIB=${2:-16}
SECS=${3:-10}
cd "$(dirname "$0")/.."
source scripts/nested/lib.sh
command -v iperf3 >/dev/null || { log "iperf3 not found (apt-get install iperf3)"; exit 1; }
prepare_bench

W=$(mktemp -d "$NESTED_WORK/netbench.XXXX")
trap 'rm -rf "$W"' EXIT
HOST_IP=198.18.0.1
GUEST_IP=198.18.0.10
MAC=02:00:c6:12:00:0a
BYTES=$((MIB << 20))

busybox_root "$W/inner"
copy_modules "$W/inner/lib/modules" virtio_pci virtio_net
copy_binary_with_libs iperf3 "$W/inner"
# The NIC's interrupts so far, summed over CPUs: "input=N output=M" (the virtio-net queues'
# MSI-X vectors are named virtioX-input.Q and virtioX-output.Q).
write_init "$W/inner" <<INIT
irqs() {
    awk '/-input\./ || /-output\./ { s = 0; for (i = 2; i <= NF; i++) if (\$i ~ /^[0-9]+\$/) s += \$i; else break
        if (\$NF ~ /-input\./) inp += s; else out += s }
        END { printf "input=%d output=%d", inp, out }' /proc/interrupts
}
# iperf3's receiver-side rate in Kbit/s (the [SUM] line with several streams).
iperf_kbits() { grep receiver | tail -1 | awk '{for (i = 1; i < NF; i++) if (\$(i + 1) == "Kbits/sec") print \$i}'; }
ip link set lo up
ip addr add $GUEST_IP/24 dev eth0; ip link set eth0 up
ping -c 2 -W 5 $HOST_IP >/dev/null
Q=\$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)
echo "NETSTAT queues \$Q"
if [ \$Q = 1 ]; then
    echo NET-RX-START; nc $HOST_IP 5001 > /dev/null; echo NET-RX-END
    echo NET-TX-START; head -c $BYTES /dev/zero | nc $HOST_IP 5002; echo NET-TX-END
fi
for dir in rx tx; do
    flag=; [ \$dir = rx ] && flag=-R
    before=\$(irqs)
    kbits=\$(iperf3 -c $HOST_IP -t $SECS -P \$Q \$flag -f k 2>&1 | iperf_kbits)
    echo "NETSTAT iperf-\$dir kbits=\${kbits:-none} before \$before after \$(irqs)"
done
echo "NETSTAT ping \$(ping -c 20 -i 0.2 $HOST_IP | tail -1)"
poweroff -f
INIT
pack_initramfs "$W/inner" "$W/inner.cpio.gz"

busybox_root "$W/outer"
copy_modules "$W/outer/lib/modules" kvm_amd tun bridge
cp "$STATIC_VMM" "$W/outer/vmm"; cp "$STATIC_BENCH" "$W/outer/bench"
cp "$VMLINUX" "$W/outer/vmlinux"; cp "$W/inner.cpio.gz" "$W/outer/initrd"
copy_qemu_into "$W/outer"
copy_binary_with_libs iperf3 "$W/outer"
CMDLINE="console=ttyS0 reboot=k panic=-1 loglevel=4"
QEMU="/usr/bin/qemu-system-x86_64 -M q35,accel=kvm -cpu host -smp 2 -m 512 -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel /vmlinux -initrd /initrd -append '$CMDLINE'"
write_init "$W/outer" <<INIT
ip link set lo up
brctl addbr br0; ip addr add $HOST_IP/24 dev br0; ip link set br0 up
head -c $BYTES /dev/urandom > /payload
mkfifo /nc-in
mkdir -p /tmp; iperf3 -s -D --logfile /iperf3.log
# Each run gets a fresh TAP and fresh listeners, so no VMM inherits another's TAP state.
# With one queue pair the TAP is made here; with more, the VMM makes it (a multiqueue TAP,
# one file descriptor per pair) and it is bridged as soon as it exists.
listeners() {
    ip link del tap0 2>/dev/null
    if [ \$1 = 1 ]; then
        tunctl -t tap0 >/dev/null; brctl addif br0 tap0; ip link set tap0 up
    else
        ( i=0; while ! ip link show tap0 >/dev/null 2>&1 && [ \$i -lt 600 ]; do sleep 0.1; i=\$((i+1)); done
          brctl addif br0 tap0; ip link set tap0 up ) &
    fi
    nc -l -p 5001 < /payload &
    nc -l -p 5002 < /nc-in > /dev/null &
}
stamp() {
    /bench stamp --timeout-s \${STAMP_TIMEOUT:-900} --capture NETSTAT --marker rx0=NET-RX-START --marker rx1=NET-RX-END \
        --marker tx0=NET-TX-START --marker tx1=NET-TX-END -- "\$@"
}
exec 3<> /nc-in
if [ -n "${DEBUG_QEMU:-}" ]; then
  listeners 1
  STAMP_TIMEOUT=300 stamp $QEMU -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=$MAC,romfile=
  poweroff -f
fi
for run in \$(seq 1 $RUNS); do
  for q in 1 2; do
    # QEMU's multiqueue: the netdev's queues, and mq=on with a vector per queue plus two.
    mq=; [ \$q -gt 1 ] && mq=,mq=on,vectors=\$((2 * q + 2))
    listeners \$q
    echo "RESULT qemu-q35 \$q \$(stamp $QEMU -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,queues=\$q -device virtio-net-pci,netdev=n0,mac=$MAC,romfile=\$mq)"
    listeners \$q
    echo "RESULT stratus-vmm \$q \$(stamp /vmm --kernel /vmlinux --initrd /initrd --cpus 2 --memory 512 --net tap=tap0,mac=$MAC,queues=\$q --cmdline '$CMDLINE')"
  done
done
grep -i error /iperf3.log | sed 's/^/L1-IPERF3 /'
poweroff -f
INIT
pack_initramfs "$W/outer" "$W/outer.cpio.gz"

CONSOLE=$NESTED_WORK/nested_net.console.log
log "running $RUNS alternated runs per VMM and queue count in L1 (console: $CONSOLE)"
run_l1 "$W/outer.cpio.gz" "$CONSOLE" 5400
python3 - "$CONSOLE" "$MIB" "$SECS" <<'PY'
import json, re, statistics, sys
mib, secs = int(sys.argv[2]), int(sys.argv[3])
runs = {}   # (vmm, queues) -> [stamp JSON]
problems = []
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("RESULT ") and "STAMP " in line:
        _, vmm, q = line.split()[:3]
        runs.setdefault((vmm, int(q)), []).append(json.loads(line.split("STAMP ", 1)[1]))
    elif line.startswith("L1-IPERF3"):
        problems.append(line.strip())
if not any(vmm == "stratus-vmm" for vmm, _ in runs):
    sys.exit("no stratus-vmm results in the console log")

def med(values):
    return statistics.median(values) if values else None

def stats(key):
    rx, tx, rtt, seen_q = [], [], [], []
    iperf = {"rx": [], "tx": []}
    irq = {"rx": [], "tx": []}   # interrupts per MiB moved: (input, output)
    for r in runs.get(key, []):
        captured = r.get("captured", [])
        cap = lambda tag: next((l for l in captured if l.startswith(f"NETSTAT {tag}")), None)
        if (q := cap("queues ")):
            seen_q.append(int(q.split()[2]))
        if key[1] == 1:
            if None in (r.get("rx0"), r.get("rx1"), r.get("tx0"), r.get("tx1")):
                problems.append(f"{key}: an nc transfer did not finish: {r}")
            else:
                rx.append(mib / ((r["rx1"] - r["rx0"]) / 1000))
                tx.append(mib / ((r["tx1"] - r["tx0"]) / 1000))
        for d in ("rx", "tx"):
            line = cap(f"iperf-{d} ")
            m = line and re.search(r"kbits=([0-9.]+) before input=(\d+) output=(\d+) after input=(\d+) output=(\d+)", line)
            if not m:
                problems.append(f"{key}: no iperf3 {d} result: {line}")
                continue
            kbits, i0, o0, i1, o1 = float(m[1]), *map(int, m.group(2, 3, 4, 5))
            mib_s = kbits * 1000 / 8 / 2**20
            iperf[d].append(mib_s)
            moved = mib_s * secs
            if moved > 0:
                irq[d].append(((i1 - i0) / moved, (o1 - o0) / moved))
        m = re.search(r"= [0-9.]+/([0-9.]+)/", cap("ping ") or "")
        if m:
            rtt.append(float(m.group(1)))
    if seen_q and set(seen_q) != {key[1]}:
        problems.append(f"{key}: the guest saw {sorted(set(seen_q))} queue pairs")
    irq_med = {d: (med([a for a, _ in v]), med([b for _, b in v])) for d, v in irq.items()}
    return dict(nc_rx=med(rx), nc_tx=med(tx), ip_rx=med(iperf["rx"]), ip_tx=med(iperf["tx"]),
                rtt=med(rtt), irq=irq_med)

cols = ("nc_rx", "nc_tx", "ip_rx", "ip_tx")
n = max(len(v) for v in runs.values())
print(f"| nested virtio-net, guest (2 vCPUs) ↔ L1 over a bridged TAP, medians of {n} | queue pairs | nc L1 → guest ({mib} MiB) | nc guest → L1 | iperf3 L1 → guest ({secs} s) | iperf3 guest → L1 | ping RTT |")
print("|---|---|---|---|---|---|---|")
table = {}
for q in (1, 2):
    base = table[("stratus-vmm", q)] = stats(("stratus-vmm", q))
    peer = table[("qemu-q35", q)] = stats(("qemu-q35", q))
    for name, s in (("stratus-vmm", base), ("QEMU q35", peer)):
        cells = []
        for c in cols:
            v = s[c]
            if v is None:
                cells.append("–" if q > 1 and c.startswith("nc") else "failed")
            elif s is peer and base[c]:
                cells.append(f"{v:.2f} MiB/s (stratus {base[c] / v:.2f}×)")
            else:
                cells.append(f"{v:.2f} MiB/s")
        if s["rtt"] is None:
            cells.append("failed")
        elif s is peer and base["rtt"]:
            cells.append(f"{s['rtt']:.2f} ms (stratus {s['rtt'] / base['rtt']:.2f}× lower)")
        else:
            cells.append(f"{s['rtt']:.2f} ms")
        print(f"| {name} | {q} | " + " | ".join(cells) + " |")
print()
print("| guest interrupts per MiB moved by iperf3 (medians), input / output vectors | queue pairs | L1 → guest | guest → L1 |")
print("|---|---|---|---|")
fmt = lambda p: "–" if p[0] is None else f"{p[0]:.0f} / {p[1]:.0f}"
for q in (1, 2):
    for name, key in (("stratus-vmm", ("stratus-vmm", q)), ("QEMU q35", ("qemu-q35", q))):
        s = table[key]
        print(f"| {name} | {q} | {fmt(s['irq']['rx'])} | {fmt(s['irq']['tx'])} |")
for p in problems:
    print(f"[nested_net] {p}", file=sys.stderr)
PY
