#!/bin/bash
# Boot time of the same stock Debian kernel + busybox initramfs (2 vCPUs, 512 MiB, 8 MiB
# virtio-blk disk, the same command line) on stratus-vmm, Firecracker, Cloud Hypervisor and
# QEMU-KVM (q35 and microvm), alternated in one QEMU-TCG L1 guest with nested SVM. Times
# are taken inside L1 by a static stratus-bench that watches each VMM's console: process
# start -> "Linux version" (kernel start) -> "STRATUS-INIT" (/init) -> exit after
# power-off. Only ratios mean anything here.
#
# usage: benches/nested_boot.sh [runs-per-vmm]              (prints a Markdown table)
#        benches/nested_boot.sh --initcalls [runs-per-vmm]  (boots with initcall_debug and
#            lists, per VMM, every initcall that took over 20 ms in any of them, side by side)
#
# Firecracker and Cloud Hypervisor are the static builds in ../shared/peers (PEERS= to
# point elsewhere); a missing one is left out of the table with a note. NESTED_BOOT_QEMU=0
# leaves QEMU out; NESTED_BOOT_THP=never|madvise|always sets L1's transparent huge pages;
# NESTED_BOOT_TRACE=1 adds, per boot, L1's KVM exits by reason with the time spent in
# them, port I/O by port, MSR writes and exits to the VMM (hist triggers on L1's
# tracepoints; TRACE lines in the console log, a table of the exits after the boot table). Firecracker does not
# exit when its guest powers off, so it is stopped at /init and has no exit time.
set -euo pipefail
MODE=boot
if [ "${1:-}" = --initcalls ]; then MODE=initcalls; shift; fi
RUNS=${1:-3}
cd "$(dirname "$0")/.."
source scripts/nested/lib.sh
# Five VMMs and QEMU's libraries: gzip -1 makes an initrd QEMU's microvm places badly.
export NESTED_COMPRESS=${NESTED_COMPRESS:-xz -T2 -3 --check=crc32}
PEERS=${PEERS:-$REPO_ROOT/../shared/peers}
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
# stratus-vmm runs twice: as shipped (its seccomp filters on) and with --seccomp off, as
# Firecracker and Cloud Hypervisor run here (--no-seccomp, --seccomp false).
VMMS="stratus-vmm stratus-vmm-no-seccomp"
for peer in firecracker cloud-hypervisor; do
    if [ -x "$PEERS/$peer" ]; then
        cp "$PEERS/$peer" "$W/outer/$peer"; VMMS="$VMMS $peer"
    else
        log "no $PEERS/$peer: left out"
    fi
done
VMMS="$VMMS qemu-q35 qemu-microvm"
# NESTED_BOOT_QEMU=0 leaves QEMU out (a shorter run when only the race with Firecracker
# and Cloud Hypervisor is wanted).
[ "${NESTED_BOOT_QEMU:-1}" = 0 ] && VMMS=${VMMS% qemu-q35 qemu-microvm}

CMDLINE="console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 loglevel=6"
BOOT_TIMEOUT_S=90
# initcall_debug prints at KERN_DEBUG: the console must show everything, and printing it
# all over the emulated serial port takes minutes.
if [ $MODE = initcalls ]; then
    CMDLINE="console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 initcall_debug ignore_loglevel"
    BOOT_TIMEOUT_S=400
fi
cat > "$W/outer/fc.json" <<JSON
{"boot-source": {"kernel_image_path": "/vmlinux", "initrd_path": "/initrd", "boot_args": "$CMDLINE"},
 "drives": [{"drive_id": "d0", "path_on_host": "/disk.img", "is_root_device": false, "is_read_only": false}],
 "machine-config": {"vcpu_count": 2, "mem_size_mib": 512}}
JSON
DISKS_Q35="-drive file=/disk.img,format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0"
DISKS_MICRO="-drive file=/disk.img,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0"
QCOMMON="-cpu host -smp 2 -m 512 -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel /vmlinux -initrd /initrd"
TRACE=${NESTED_BOOT_TRACE:+1}
write_init "$W/outer" <<INIT
truncate -s 8M /disk.img
# event:keys[:values]; synthetic/vmexit is each exit's duration, L1's kvm_exit to its next
# kvm_entry on the same vCPU thread: KVM's handling plus, for exits to user space, the VMM's.
TRACES="kvm/kvm_exit:exit_reason kvm/kvm_pio:port,rw kvm/kvm_msr:ecx,write kvm/kvm_userspace_exit:reason synthetic/vmexit:reason,vcpu:ns"
# trace start | trace stop <name>: a histogram per tracepoint from start to stop.
trace() {
  for t in \$TRACES; do
    f=/sys/kernel/tracing/events/\${t%%:*}/trigger
    spec=\${t#*:}
    hist="hist:keys=\${spec%%:*}"
    [ "\$spec" = "\${spec#*:}" ] || hist="\$hist:vals=hitcount,\${spec#*:}"
    hist="\$hist:sort=hitcount:size=256"
    case \$1 in
    start) echo "\$hist" > \$f ;;
    *) # Only this histogram: kvm_exit also carries the trigger that times each exit.
       awk -v k="hist:keys=\${spec%%:*}:" '/^# trigger info:/ { on = index(\$0, k) > 0 }
           /^#/ { next } on && NF' \${f%trigger}hist | sed "s|^|TRACE \$2 \${t%%:*} |"
       echo "!\$hist" > \$f ;;
    esac
  done
  # L1's memory work during the boot: direct compaction and huge-page faults.
  case \$1 in
  start) cp /proc/vmstat /vmstat.before ;;
  *) awk -v n="\$2" 'NR == FNR { before[\$1] = \$2; next }
         /^(compact_stall|compact_fail|compact_success|thp_fault_alloc|thp_fault_fallback) / {
             print "TRACE " n " vmstat " \$1 " " \$2 - before[\$1] }' /vmstat.before /proc/vmstat ;;
  esac
}
if [ -n "$TRACE" ]; then
  mount -t tracefs nodev /sys/kernel/tracing
  cd /sys/kernel/tracing
  echo 'vmexit unsigned int reason; unsigned int vcpu; u64 ns' >> synthetic_events
  echo 'hist:keys=common_pid:t0=common_timestamp:r=exit_reason:v=vcpu_id' >> events/kvm/kvm_exit/trigger
  echo 'hist:keys=common_pid:d=common_timestamp-\$t0:onmatch(kvm.kvm_exit).trace(vmexit,\$r,\$v,\$d)' >> events/kvm/kvm_entry/trigger
  cd /
fi
[ -n "${NESTED_BOOT_THP:-}" ] && echo ${NESTED_BOOT_THP:-} > /sys/kernel/mm/transparent_hugepage/enabled
echo "L1-THP \$(cat /sys/kernel/mm/transparent_hugepage/enabled)"
# stamp <name> <command...>: one RESULT line; in initcall mode, also one INITCALL line per
# initcall over 20 ms.
stamp() {
  local name=\$1 stop=; shift
  [ "\$name" = firecracker ] && stop="--stop-after init"
  [ -z "$TRACE" ] || trace start
  echo "RESULT \$name \$(/bench stamp --timeout-s $BOOT_TIMEOUT_S --output /console.txt \$stop --marker kernel="Linux version" --marker init=STRATUS-INIT -- "\$@")"
  [ -z "$TRACE" ] || trace stop \$name
  if [ $MODE = initcalls ]; then
    sed -n 's/.*initcall \([^ ]*\) returned .* after \([0-9]*\) usecs.*/\1 \2/p' /console.txt |
      while read -r fn us; do [ "\$us" -gt 20000 ] && echo "INITCALL \$name \$fn \$us"; done
    grep -m1 -i "rtc" /console.txt | sed "s/^/CONSOLE \$name /"
  fi
}
run() {
  case \$1 in
  stratus-vmm) stamp \$1 /vmm --kernel /vmlinux --initrd /initrd --cpus 2 --memory 512 --disk path=/disk.img --cmdline '$CMDLINE' ;;
  stratus-vmm-no-seccomp) stamp \$1 /vmm --seccomp off --kernel /vmlinux --initrd /initrd --cpus 2 --memory 512 --disk path=/disk.img --cmdline '$CMDLINE' ;;
  firecracker) stamp \$1 /firecracker --no-api --config-file /fc.json --enable-pci --no-seccomp ;;
  cloud-hypervisor) stamp \$1 /cloud-hypervisor --kernel /vmlinux --initramfs /initrd --cmdline '$CMDLINE' --cpus boot=2 --memory size=512M --disk path=/disk.img,image_type=raw --serial tty --console off --seccomp false ;;
  qemu-q35) stamp \$1 /usr/bin/qemu-system-x86_64 -M q35,accel=kvm $QCOMMON $DISKS_Q35 -append '$CMDLINE' ;;
  qemu-microvm) stamp \$1 /usr/bin/qemu-system-x86_64 -M microvm,accel=kvm,rtc=off $QCOMMON $DISKS_MICRO -append '$CMDLINE' ;;
  esac
}
for r in \$(seq 1 $RUNS); do
  for vmm in $VMMS; do run \$vmm; done
done
poweroff -f
INIT
pack_initramfs "$W/outer" "$W/outer.cpio.gz"

CONSOLE=$NESTED_WORK/nested_boot.$MODE.console.log
log "running $RUNS alternated boots per VMM ($VMMS) in L1, mode $MODE (console: $CONSOLE)"
# Five VMMs and QEMU's libraries make a large initramfs: give L1 time to unpack it.
NESTED_SILENT_S=${NESTED_SILENT_S:-240} run_l1 "$W/outer.cpio.gz" "$CONSOLE" 5400
python3 - "$CONSOLE" "$MODE" "$VMMS" <<'PY'
import json, re, statistics, sys
console, mode, vmms = sys.argv[1], sys.argv[2], sys.argv[3].split()
rows, initcalls = {}, {}
# exits[name][run][(reason, vcpu)] = (count, ns), from NESTED_BOOT_TRACE's synthetic/vmexit
# lines, which follow their boot's RESULT line.
exits = {}
vmexit = re.compile(r"TRACE (\S+) synthetic/vmexit \{ reason:\s*(\d+), vcpu:\s*(\d+) \} hitcount:\s*(\d+)\s+ns:\s*(\d+)")
for line in open(console, errors="replace"):
    line = line.rstrip("\r\n")
    if line.startswith("RESULT ") and "STAMP " in line:
        name = line.split()[1]
        rows.setdefault(name, []).append(json.loads(line.split("STAMP ", 1)[1]))
        exits.setdefault(name, []).append({})
    elif m := vmexit.match(line):
        name, reason, vcpu, count, ns = m.group(1), *map(int, m.group(2, 3, 4, 5))
        if exits.get(name):
            exits[name][-1][(reason, vcpu)] = (count, ns)
    elif line.startswith("INITCALL "):
        _, name, fn, us = line.split()
        initcalls.setdefault(fn, {}).setdefault(name, []).append(int(us))
if "stratus-vmm" not in rows:
    sys.exit("no stratus-vmm results in the console log")

def med(name, key):
    vals = [r[key] for r in rows.get(name, []) if r.get(key) is not None]
    return statistics.median(vals) if vals and len(vals) == len(rows[name]) else None

if mode == "initcalls":
    print(f"| initcall over 20 ms (median ms of {len(rows['stratus-vmm'])} boots with initcall_debug) | " + " | ".join(vmms) + " |")
    print("|---|" + "---|" * len(vmms))
    order = sorted(initcalls, key=lambda fn: -max(statistics.median(v) for v in initcalls[fn].values()))
    for fn in order:
        cells = []
        for name in vmms:
            v = initcalls[fn].get(name)
            cells.append(f"{statistics.median(v) / 1000:.0f}" if v else "< 20")
        print(f"| `{fn}` | " + " | ".join(cells) + " |")
    print("| **/init (ms, with initcall_debug)** | " + " | ".join(
        "failed" if med(n, "init") is None else f"{med(n, 'init'):.0f}" for n in vmms) + " |")
    sys.exit(0)

runs = len(rows["stratus-vmm"])
print(f"| nested boot, 2 vCPUs / 512 MiB, medians of {runs} alternated runs (L1 ms; in brackets stratus-vmm's time / this VMM's) | kernel start | /init | exit after power-off |")
print("|---|---|---|---|")
base = {k: med("stratus-vmm", k) for k in ("kernel", "init", "exit")}
for name in vmms:
    cells = []
    for k in ("kernel", "init", "exit"):
        v = med(name, k)
        if med(name, "init") is None:
            # Never reached /init: its exit was the timeout's kill.
            v = None
        if v is None:
            cells.append("n/a (stopped at /init)" if name == "firecracker" and k == "exit" else "failed")
        elif name == "stratus-vmm" or not base[k]:
            cells.append(f"{v:.0f} ms")
        else:
            cells.append(f"{v:.0f} ms ({base[k] / v:.2f})")
    print(f"| {name} | " + " | ".join(cells) + " |")
peers = [med(n, "init") for n in ("firecracker", "cloud-hypervisor") if med(n, "init")]
if peers and base["init"]:
    print(f"\nstratus-vmm /init time / fastest of Firecracker and Cloud Hypervisor: {base['init'] / min(peers):.2f} (goal <= 0.85)")
    if med("stratus-vmm-no-seccomp", "init"):
        print(f"the same with its seccomp filters off, as the peers run here: {med('stratus-vmm-no-seccomp', 'init') / min(peers):.2f}")

traced = [n for n in vmms if any(exits.get(n, []))]
if traced:
    # AMD SVM exit codes (arch/x86/include/uapi/asm/svm.h).
    names = {0x10: "CR0 write", 0x14: "CR4 write", 0x30: "DR0 write", 0x60: "host interrupt",
             0x64: "interrupt window", 0x65: "CR0 selective write", 0x72: "CPUID", 0x78: "HLT",
             0x7b: "port I/O", 0x7c: "MSR", 0x81: "VMMCALL", 0x89: "WBINVD", 0x8d: "XSETBV",
             0x400: "nested page fault"}
    # A row is an exit reason on all vCPUs, or on one (vcpu not None), or everything.
    def cell(name, reason, vcpu=None):
        runs = [[v for (r, c), v in run.items()
                 if reason in (None, r) and vcpu in (None, c)] for run in exits[name]]
        return (statistics.median(sum(c for c, _ in r) for r in runs),
                statistics.median(sum(t for _, t in r) for r in runs) / 1e6)
    reasons = sorted({r for n in traced for run in exits[n] for r, _ in run},
                     key=lambda r: -cell(traced[0], r)[1])
    vcpus = sorted({c for n in traced for run in exits[n] for _, c in run})
    print(f"\n| L1 exits per boot: count, ms from exit to re-entry, both vCPUs (medians) | " + " | ".join(traced) + " |")
    print("|---|" + "---|" * len(traced))
    rows = []
    for reason in reasons:
        rows.append((f"{names.get(reason, hex(reason))} ({reason})", reason, None))
        # Idle time means little summed: the boot vCPU's waits are the ones on the way.
        if reason == 0x78:
            rows += [(f"HLT on vCPU {c}", reason, c) for c in vcpus]
    rows.append(("**all**", None, None))
    for label, reason, vcpu in rows:
        print(f"| {label} | " + " | ".join(
            "{:.0f}, {:.0f} ms".format(*cell(n, reason, vcpu)) for n in traced) + " |")
PY
