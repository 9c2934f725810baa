#!/bin/bash
# virtio-blk as the guest sees it: Debian's fio in the same stock Debian guest (1 vCPU,
# 512 MiB) on stratus-vmm (--disk ...,cache=none,engine=io_uring) and on QEMU-KVM q35
# (virtio-blk-pci, -drive ...,aio=io_uring,cache=none), alternated in one QEMU-TCG L1 guest
# with nested SVM. Both open the same image file with O_DIRECT: it lives on ext2 on an L1
# ramdisk (brd), as L1's rootfs (tmpfs) cannot do O_DIRECT. The guest runs each fio job
# (io_uring, O_DIRECT, time-based) on /dev/vda; fio's exec_prerun/exec_postrun print a
# marker on the guest console when the job's I/O starts and ends, and L1 reads the VMM
# process's /proc/PID/stat at each marker: VMM CPU = utime + stime - guest_time (the vCPU
# threads' time in the guest is left out; their exits are counted), divided by the job's
# I/Os. Only the ratios stratus/QEMU mean anything: everything runs under TCG.
# NESTED_BLK_DISK picks what both VMMs serve the guest's disk from:
#   file   the image file (default)
#   iscsi  a LUN of Debian's tgtd in L1 on L1's loopback, backed by that same file (tgtd's
#          default rdwr store): stratus-vmm through libiscsi (--disk iscsi://...), QEMU
#          through its iscsi block driver (package qemu-block-extra, -drive file=iscsi://...)
#   rbd    an image of a throw-away Ceph cluster on this host (scripts/ceph-cluster.sh, one
#          memstore OSD) in a network namespace whose TAP is L1's NIC, written all over
#          first: stratus-vmm through librbd (its dynamically linked release build, with
#          librbd copied into L1), QEMU through its rbd block driver; librbd's cache off
#          for both (QEMU's cache=none, and rbd cache = false in L1's ceph.conf)
# One guest vCPU (CPUS=2 to change): L1 has one, and under QEMU-TCG's emulated SVM a
# 2-vCPU guest whose AP spins with interrupts off waiting for the BSP at boot
# (wait_for_master_cpu) sometimes wedges L1 for good (seen with QEMU q35, 2 of ~10 boots).
# usage: benches/nested_blk.sh [runs-per-vmm] [seconds-per-job] [file-MiB]
#        (prints a Markdown table; DEBUG_ONLY=stratus-vmm|qemu-q35 runs one VMM once;
#        NESTED_BLK_JOBS="name:rw:bs:iodepth ..." runs other jobs; NESTED_BLK_TRACE=1 adds
#        L1's KVM exits by reason, MSR writes and context switches per job to the console
#        log as TRACE lines)
set -euo pipefail
RUNS=${1:-3}
SECS=${2:-5}
MIB=${3:-256}
DISK=${NESTED_BLK_DISK:-file}
cd "$(dirname "$0")/.."
source scripts/nested/lib.sh
case $DISK in file|iscsi|rbd) ;; *) log "NESTED_BLK_DISK must be file, iscsi or rbd (not $DISK)"; exit 2 ;; esac
fetch_kernel
build_static_programs

W=$(mktemp -d "$NESTED_WORK/blkbench.XXXX")
NETNS=stratus-blkbench-$$
cleanup() {
    if [ "$DISK" = rbd ]; then
        scripts/ceph-cluster.sh stop "$W/ceph" > /dev/null 2>&1 || true
        ip netns del "$NETNS" 2>/dev/null || true
    fi
    rm -rf "$W"
}
trap cleanup EXIT

# name:rw:bs:iodepth
JOBS=${NESTED_BLK_JOBS:-"randread-4k-qd1:randread:4k:1 randread-4k-qd32:randread:4k:32 randwrite-4k-qd32:randwrite:4k:32 read-128k-qd32:read:128k:32 write-1m-qd8:write:1m:8"}

busybox_root "$W/inner"
copy_modules "$W/inner/lib/modules" virtio_pci virtio_blk
copy_fio_into "$W/inner"
# fio runs exec_prerun/postrun with its output sent to a file: the marker opens the console.
printf '#!/bin/sh\necho "$*" > /dev/console\n' > "$W/inner/mark"
chmod +x "$W/inner/mark"
write_init "$W/inner" <<INIT
i=0; while [ ! -b /dev/vda ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i+1)); done
[ -b /dev/vda ] || echo "BLK-NO-DISK"
for job in $JOBS; do
    set -- \$(echo \$job | tr : ' ')
    fio --name=\$1 --filename=/dev/vda --ioengine=io_uring --direct=1 --rw=\$2 --bs=\$3 \\
        --iodepth=\$4 --size=${MIB}m --time_based --runtime=$SECS --norandommap --randrepeat=0 \\
        --exec_prerun="/mark BLK-JOB-START \$1" --exec_postrun="/mark BLK-JOB-END \$1" \\
        --output-format=terse > /fio.out 2>&1
    rc=\$?
    echo "BLK-RESULT \$1 \$3 rc=\$rc \$(grep '^3;' /fio.out)"
    [ \$rc = 0 ] || sed 's/^/BLK-FIO-LOG /' /fio.out
done
echo "BLK-DONE"
poweroff -f
INIT
pack_initramfs "$W/inner" "$W/inner.cpio.gz"

busybox_root "$W/outer"
# ext4 mounts ext2 and wants a crc32c driver even then.
copy_modules "$W/outer/lib/modules" kvm_amd crc32c_generic ext4
# brd takes its size as a module parameter, so it is loaded by hand below.
copy_modules "$W/outer/lib/brd" brd
cp "$STATIC_VMM" "$W/outer/vmm"
cp "$VMLINUX" "$W/outer/vmlinux"; cp "$W/inner.cpio.gz" "$W/outer/initrd"
CMDLINE="console=ttyS0 reboot=k panic=-1 loglevel=4"
IQN=iqn.2026-12.eu.stratuslab.bench:disk
# What each VMM is given for the disk, and what L1 does before the runs.
case $DISK in
file)
    copy_qemu_into "$W/outer"
    VMM=/vmm
    STRATUS_DISK=path=/mnt/disk.img,cache=none,engine=io_uring
    QEMU_DRIVE=file=/mnt/disk.img,if=none,id=d0,format=raw,aio=io_uring,cache=none
    L1_SETUP=: ;;
iscsi)
    copy_qemu_into "$W/outer" block-iscsi
    copy_tgtd_into "$W/outer"
    VMM=/vmm
    STRATUS_DISK=iscsi://127.0.0.1:3260/$IQN/1
    QEMU_DRIVE=file=iscsi://127.0.0.1:3260/$IQN/1,if=none,id=d0,format=raw,cache=none
    L1_SETUP="ip link set lo up
$(tgtd_l1_script $IQN /mnt/disk.img) || echo BLK-SETUP-FAILED tgtd" ;;
rbd)
    CEPH_ADDR=198.18.73.1
    L1_ADDR=198.18.73.2
    ceph_behind_l1 "$NETNS" "$CEPH_ADDR" "$W/ceph"
    head -c ${MIB}M /dev/urandom > "$W/rbd.img"
    ip netns exec "$NETNS" rbd -c "$W/ceph/ceph.conf" import --no-progress "$W/rbd.img" rbd/bench
    rm -f "$W/rbd.img"
    (cd "$REPO_ROOT" && cargo build --quiet --release -p stratus-vmm --bin stratus-vmm)
    copy_binary_with_libs "$REPO_ROOT/target/release/stratus-vmm" "$W/outer"
    copy_librbd_into "$W/outer"
    copy_qemu_into "$W/outer" block-rbd
    copy_modules "$W/outer/lib/net" virtio_mmio virtio_net
    copy_ceph_client_into "$W/outer" "$W/ceph" "rbd cache = false"
    VMM=/usr/bin/stratus-vmm
    STRATUS_DISK=rbd:rbd/bench,conf=/ceph/ceph.conf,id=stratus,keyring=/ceph/client.stratus.keyring
    QEMU_DRIVE=file=rbd:rbd/bench:conf=/ceph/ceph.conf:id=stratus:keyring=/ceph/client.stratus.keyring,if=none,id=d0,format=raw,cache=none
    NESTED_QEMU_NETNS=$NETNS
    NESTED_QEMU_ARGS=(-netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=n0)
    L1_SETUP="for m in \$(cat /lib/net/order); do insmod /lib/net/\$m; done
ip link set lo up; ip addr add $L1_ADDR/24 dev eth0 && ip link set eth0 up || echo BLK-SETUP-FAILED eth0" ;;
esac
# One VMM run: boot, five jobs of SECS seconds each (plus fio's start-up under TCG).
RUN_TIMEOUT=$((240 + 5 * (SECS + 40)))
CPUS=${CPUS:-1}
TRACE=${NESTED_BLK_TRACE:+1}
if [ -n "${DEBUG_ONLY:-}" ]; then ORDER=$DEBUG_ONLY; RUNS=1; else ORDER="qemu-q35 stratus-vmm"; fi
write_init "$W/outer" <<INIT
insmod /lib/brd/brd.ko rd_nr=1 rd_size=$(((MIB + 64) * 1024)) || echo "BLK-SETUP-FAILED brd"
mke2fs -b 4096 /dev/ram0 > /dev/null && mount -t ext2 /dev/ram0 /mnt || echo "BLK-SETUP-FAILED ext2 on /dev/ram0"
dd if=/dev/zero of=/mnt/disk.img bs=1M count=$MIB 2>/dev/null || echo "BLK-SETUP-FAILED disk.img"
$L1_SETUP
start_stratus() {
    timeout -s KILL $RUN_TIMEOUT $VMM --kernel /vmlinux --initrd /initrd --cpus $CPUS --memory 512 \\
        --disk $STRATUS_DISK --cmdline '$CMDLINE' < /dev/null > /con 2>&1 &
}
start_qemu() {
    timeout -s KILL $RUN_TIMEOUT /usr/bin/qemu-system-x86_64 -M q35,accel=kvm -cpu host -smp $CPUS -m 512 \\
        -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel /vmlinux -initrd /initrd \\
        -drive $QEMU_DRIVE \\
        -device virtio-blk-pci,drive=d0 -append '$CMDLINE' < /dev/null > /con 2>&1 &
}
# NESTED_BLK_TRACE=1: L1's KVM exits by reason, MSRs written (an x2APIC EOI per guest
# interrupt), exits to the VMM and context switches, per job (hist triggers on L1's
# tracepoints), printed as TRACE lines.
TRACES="kvm/kvm_exit:exit_reason kvm/kvm_msr:ecx,write kvm/kvm_userspace_exit:reason sched/sched_switch:next_comm"
trace_job() {
    for t in \$TRACES; do
        f=/sys/kernel/tracing/events/\${t%%:*}/trigger
        case \$1 in
        *BLK-JOB-START*) echo "hist:keys=\${t#*:}:sort=hitcount:size=256" > \$f ;;
        *) grep -v '^#' \${f%trigger}hist | grep . | sed "s|^|TRACE \${t%%:*} |"
           echo "!hist:keys=\${t#*:}:sort=hitcount:size=256" > \$f ;;
        esac
    done
}
[ -z "$TRACE" ] || mount -t tracefs nodev /sys/kernel/tracing
# run <vmm> <run>: the VMM's console goes through a FIFO read here with shell built-ins only
# (a fork per line costs seconds on L1's one vCPU); at each job marker the VMM's stat line
# is read (busybox timeout execs the VMM, so \$! is its PID).
run() {
    rm -f /con; mkfifo /con
    case \$1 in stratus-vmm) start_stratus ;; qemu-q35) start_qemu ;; esac
    pid=\$!
    while IFS= read -r line; do
        case \$line in
        *BLK-JOB-START*|*BLK-JOB-END*) stat=; read -r stat < /proc/\$pid/stat; echo "CPU \$1 \$2 \${line#*BLK-JOB-} \$stat"
            [ -z "$TRACE" ] || trace_job "\$line" ;;
        *BLK-RESULT*) echo "RESULT \$1 \$2 \${line#*BLK-RESULT }" ;;
        *) echo "\$1| \$line" ;;
        esac
    done < /con
    wait \$pid
    echo "RUN-EXIT \$1 \$2 rc=\$?"
}
for r in \$(seq 1 $RUNS); do
    for v in $ORDER; do run \$v \$r; done
done
poweroff -f
INIT
pack_initramfs "$W/outer" "$W/outer.cpio.gz"

CONSOLE=$NESTED_WORK/nested_blk.$DISK.console.log
log "running $RUNS alternated runs per VMM, $SECS s per fio job, $MIB MiB $DISK disk, in L1 (console: $CONSOLE)"
# Every job prints within a few minutes; a console silent for 5 minutes means a hung L1.
NESTED_SILENT_S=180 run_l1 "$W/outer.cpio.gz" "$CONSOLE" $((300 + 2 * RUNS * RUN_TIMEOUT)) 300 \
    || log "L1 did not finish; the table has the runs that completed"
python3 - "$CONSOLE" "$JOBS" "$SECS" "$MIB" "$RUNS" "$ORDER" "$CPUS" "$DISK" <<'PY'
import statistics, sys
console, jobs, secs, mib = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
runs_wanted, order, cpus, disk = int(sys.argv[5]), sys.argv[6].split(), sys.argv[7], sys.argv[8]
jobs = [j.split(":") for j in jobs]
USER_HZ = 100
problems = []
# Split on \n only: the guest's lines end in a \r that L1 copies into the middle of its own.
lines = [l.replace("\r", "") for l in open(console, errors="replace", newline="").read().split("\n")]
for l in lines:
    if l.startswith(("BLK-SETUP-FAILED", "BLK-NO-DISK")) or "BLK-SETUP-FAILED" in l or "BLK-NO-DISK" in l:
        problems.append(l)
    if l.startswith("RUN-EXIT ") and not l.endswith("rc=0"):
        problems.append(l + (" (killed at the run's time limit)" if l.endswith("rc=137") else ""))
    if "BLK-FIO-LOG" in l:
        problems.append(l)

def stat_fields(stat):
    # "pid (comm) state ppid ...": fields after the comm, numbered from 3.
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    rest = stat[stat.rindex(")") + 2:].split()
    field = lambda n: int(rest[n - 3])
    return comm, field(14) + field(15) - field(43), field(43)

cpu = {}   # (vmm, run, job) -> {"START": (comm, ticks, guest), "END": ...}
res = {}   # (vmm, run, job) -> (ops, iops, mib_s)
for l in lines:
    p = l.split(" ", 5)
    if l.startswith("CPU ") and len(p) == 6:
        _, vmm, run, edge, job, stat = p
        try:
            cpu.setdefault((vmm, run, job), {})[edge] = stat_fields(stat)
        except (ValueError, IndexError):
            problems.append(f"unreadable stat line: {l}")
    elif l.startswith("RESULT ") and len(p) >= 6:
        _, vmm, run, job, bs, rest = l.split(" ", 5)
        rc, _, terse = rest.partition(" ")
        if rc != "rc=0" or not terse.startswith("3;"):
            problems.append(f"{vmm} run {run} {job}: fio {rc}")
            continue
        t = terse.split(";")
        bs_kib = int(bs[:-1]) * (1024 if bs.endswith("m") else 1)
        kib = int(t[5]) + int(t[46])
        ops = kib / bs_kib
        iops = float(t[7]) + float(t[48])
        mib_s = (int(t[6]) + int(t[47])) / 1024
        res[(vmm, run, job)] = (ops, iops, mib_s)

for r in range(1, runs_wanted + 1):
    for vmm in order:
        missing = [j[0] for j in jobs if (vmm, str(r), j[0]) not in res]
        if missing:
            problems.append(f"{vmm} run {r}: no result for {' '.join(missing)}")

def per_job(vmm, job):
    perf, cost = [], []
    for (v, run, j), (ops, iops, mib_s) in res.items():
        if v != vmm or j != job:
            continue
        perf.append(iops if "4k" in job else mib_s)
        c = cpu.get((v, run, j), {})
        if "START" in c and "END" in c and ops > 0:
            if c["START"][0] != c["END"][0]:
                problems.append(f"{v} run {run} {j}: the stat lines name different processes")
                continue
            cost.append((c["END"][1] - c["START"][1]) / USER_HZ * 1e6 / ops)
        else:
            problems.append(f"{v} run {run} {j}: no CPU sample around the job")
    return (statistics.median(perf) if perf else None, statistics.median(cost) if cost else None, len(perf))

names = ("stratus-vmm", "qemu-q35")
rows = {n: {j[0]: per_job(n, j[0]) for j in jobs} for n in names}
runs = max((r[2] for n in names for r in rows[n].values()), default=0)
fmt = lambda v, unit: "failed" if v is None else (f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}")
ratio = lambda a, b: "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"
what = {"file": "file", "iscsi": "iSCSI LUN (tgtd in L1)", "rbd": "RBD image (Ceph beside L1)"}[disk]
print(f"| nested virtio-blk on a {mib} MiB {what}, fio in the guest ({cpus} vCPU, io_uring, O_DIRECT, {secs} s per job), medians of {runs} | stratus-vmm | QEMU q35 | stratus / QEMU | VMM CPU µs/IO stratus | QEMU | stratus / QEMU (lower: stratus cheaper) |")
print("|---|---|---|---|---|---|---|")
for name, rw, bs, qd in jobs:
    unit = "IOPS" if "4k" in name else "MiB/s"
    (sp, sc, _), (qp, qc, _) = rows["stratus-vmm"][name], rows["qemu-q35"][name]
    label = f"{rw} {bs} QD{qd}"
    cell = lambda v: "failed" if v is None else f"{v:.0f}"
    print(f"| {label} | {fmt(sp, unit)} | {fmt(qp, unit)} | {ratio(sp, qp)} | {cell(sc)} | {cell(qc)} | {ratio(sc, qc)} |")
for p in problems:
    print(f"[nested_blk] {p}", file=sys.stderr)
if all(rows["stratus-vmm"][j[0]][0] is None for j in jobs):
    sys.exit("no stratus-vmm results in the console log")
PY
