# Shared pieces of the nested harness: real Linux on stratus-vmm inside a QEMU-TCG L1 guest
# with emulated AMD SVM (this host's /dev/kvm is PVM and cannot run stock kernels itself).
# Source it. NESTED_WORK (the scratch directory, created here) defaults to target/nested.

NESTED_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$NESTED_LIB_DIR/../.." && pwd)
NESTED_WORK=${NESTED_WORK:-$REPO_ROOT/target/nested}
mkdir -p "$NESTED_WORK"

log() { echo "[nested] $*" >&2; }

# Downloads the current Debian kernel package once and unpacks it.
# Sets KVER, KPKG_DIR (unpacked tree), KMOD_DIR, VMLINUX (uncompressed ELF), BZIMAGE.
fetch_kernel() {
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$pkg" ] || { log "cannot resolve linux-image-amd64 (run apt-get update)"; return 1; }
    KVER=${pkg#linux-image-}
    KPKG_DIR=$NESTED_WORK/kernel-$KVER
    if [ ! -f "$KPKG_DIR/.done" ]; then
        rm -rf "$KPKG_DIR"; mkdir -p "$KPKG_DIR"
        (cd "$KPKG_DIR" && apt-get -o APT::Sandbox::User=root download "$pkg" >/dev/null && dpkg-deb -x ./*.deb tree && rm -f ./*.deb)
        python3 - "$KPKG_DIR/tree/boot/vmlinuz-$KVER" "$KPKG_DIR/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
start = data.find(b'\xfd7zXZ\x00')
if start < 0:
    sys.exit('no xz payload in ' + sys.argv[1])
open(sys.argv[2], 'wb').write(lzma.LZMADecompressor().decompress(data[start:]))
PY
        touch "$KPKG_DIR/.done"
    fi
    KMOD_DIR=$KPKG_DIR/tree/lib/modules/$KVER
    VMLINUX=$KPKG_DIR/vmlinux
    BZIMAGE=$KPKG_DIR/tree/boot/vmlinuz-$KVER
    log "kernel $KVER"
}

# Cargo resolves features per invocation: a program built alone can get other features for
# its dependencies than the same program built beside others, and then the shared
# dependencies are compiled again. So every build here names one fixed set of targets.

# The debug builds the tests and scripts run (examples included): the same feature
# resolution as `cargo test --workspace`, so after the test build this costs nothing.
build_workspace_debug() {
    (cd "$REPO_ROOT" && cargo build --quiet --workspace --bins --examples)
}

# Every statically linked program that goes into an L1 host (musl cannot be installed here,
# so glibc's static libraries): stratus-vmm, the jailer the node agent starts each VMM
# through, the node agent, and the api_call and dhcp_server examples the harness drives
# them with: the first script of a run builds them all, the others find them built. Sets
# STATIC_VMM, STATIC_JAILER, STATIC_AGENT, STATIC_API_CALL, STATIC_DHCP_SERVER.
build_static_programs() {
    local dir=$REPO_ROOT/target/x86_64-unknown-linux-gnu/release
    (cd "$REPO_ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet \
        --release --target x86_64-unknown-linux-gnu \
        -p stratus-vmm -p stratus-jailer -p stratus-nodeagent \
        --bin stratus-vmm --bin stratus-jailer --bin stratus-nodeagent \
        --example api_call --example dhcp_server)
    STATIC_VMM=$dir/stratus-vmm
    STATIC_JAILER=$dir/stratus-jailer
    STATIC_AGENT=$dir/stratus-nodeagent
    STATIC_API_CALL=$dir/examples/api_call
    STATIC_DHCP_SERVER=$dir/examples/dhcp_server
    file "$STATIC_VMM" | grep -Eq 'static(-pie)? linked' || { log "$STATIC_VMM is not static"; return 1; }
}

# Builds a statically linked stratus-bench for timing VMMs inside L1 (benchmarks only, not
# the test suite). Sets STATIC_BENCH.
build_static_bench() {
    (cd "$REPO_ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
        --target x86_64-unknown-linux-gnu -p stratus-benches --bin stratus-bench)
    STATIC_BENCH=$REPO_ROOT/target/x86_64-unknown-linux-gnu/release/stratus-bench
}

# What every nested benchmark needs: the kernel, a static VMM and a static stratus-bench.
prepare_bench() {
    fetch_kernel
    build_static_programs
    build_static_bench
}

# copy_modules <dest-dir> <module>...: copies the closure, uncompressed, and writes
# <dest-dir>/order with the load order.
copy_modules() {
    local dest=$1; shift
    mkdir -p "$dest"
    : > "$dest/order"
    local path name
    while read -r path; do
        name=$(basename "$path"); name=${name%.xz}
        if [[ $path == *.xz ]]; then xz -dc "$path" > "$dest/$name"; else cp "$path" "$dest/$name"; fi
        echo "$name" >> "$dest/order"
    done < <(python3 "$NESTED_LIB_DIR/modules.py" "$KMOD_DIR" "$@")
}

# copy_program <root-dir> <command>: the command and the shared libraries it loads, at the
# paths the dynamic loader looks for them (a busybox root has no package manager).
copy_program() {
    local root=$1 path lib
    path=$(command -v "$2") || { log "$2 is not installed"; return 1; }
    mkdir -p "$root$(dirname "$path")"
    cp "$path" "$root$path"
    while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done < <(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
}

# The guests' anti-spoofing rules in a nested node: nft and the kernel modules it drives
# (a busybox root has no modprobe to load them on demand; the bridge family takes its
# meta expression, for iifname, from nft_meta_bridge).
NFT_MODULES="crc32c_generic nf_tables nft_limit nft_meta_bridge"

# write_init <root-dir>: writes <root-dir>/init as the preamble every guest here shares
# (busybox applets, /proc, /sys, /dev, the modules listed in lib/modules/order) followed by
# the script body read from standard input. A module that fails to load is reported as
# "INSMOD-FAILED <module>".
write_init() {
    {
        cat <<'PREAMBLE'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# cgroup v2 for the jailer's per-VM limits (a busybox root has no systemd to mount it).
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
if [ -f /lib/modules/order ]; then
    for m in $(cat /lib/modules/order); do insmod /lib/modules/$m || echo "INSMOD-FAILED $m"; done
fi
PREAMBLE
        cat
    } > "$1/init"
    chmod +x "$1/init"
}

# pack_initramfs <root-dir> <out.cpio.gz>
# NESTED_COMPRESS picks the compressor (default gzip -1: fastest to unpack under TCG).
# QEMU's microvm loads the initrd at the very top of low memory, rounded down to a page,
# on top of the ACPI tables its firmware keeps there: only the rounding's slack spares
# them. An initrd whose size falls just short of a page boundary overwrote L1's XSDT and
# DSDT, and L1 lost its virtio-mmio devices (found through ACPI) or hung before printing.
# So the file is padded with zeros (the kernel skips zeros after an archive) to a whole
# number of pages: QEMU then places it to end one page below the top (its limit is the
# top minus one byte), and the firmware's last page, the tables and whatever it keeps
# next to them, stays untouched.
pack_initramfs() {
    (cd "$1" && find . | cpio -o -H newc 2>/dev/null | ${NESTED_COMPRESS:-gzip -1} > "$2")
    local size
    size=$(stat -c %s "$2")
    head -c $(( (4096 - size % 4096) % 4096 )) /dev/zero >> "$2"
    log "initramfs $(basename "$2"): $(( $(stat -c %s "$2") / 1024 )) KiB"
}

# make_endorser <dir> <organisation> <endorser-name> <email> <days>: a throw-away CA
# (ca.pem, ca.key: what the Marketplace is told to trust) and the X.509 v3 endorser
# certificate it issued (endorser.pem, endorser.key) for that name and email; and
# upload-token (mode 0600), the token the Marketplace takes uploads with.
make_endorser() {
    local dir=$1 org=$2 name=$3 email=$4 days=$5
    mkdir -p "$dir"
    ( umask 077; head -c 24 /dev/urandom | base64 | tr '/+' '_-' > "$dir/upload-token" )
    printf '%s\n' "basicConstraints = critical, CA:FALSE" "keyUsage = critical, digitalSignature" \
        "extendedKeyUsage = emailProtection, clientAuth" "subjectAltName = email:$email" > "$dir/endorser.ext"
    (cd "$dir" &&
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days "$days" \
            -subj "/C=EU/O=$org/CN=$org CA" 2>/dev/null &&
        openssl req -new -newkey rsa:2048 -nodes -keyout endorser.key -out endorser.csr \
            -subj "/C=EU/O=$org/CN=$name/emailAddress=$email" 2>/dev/null &&
        openssl x509 -req -in endorser.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -extfile endorser.ext -out endorser.pem -days "$days" 2>/dev/null)
}

# busybox_root <dir>: a root with busybox and the usual mount points.
busybox_root() {
    mkdir -p "$1"/{bin,proc,sys,dev,lib/modules,tmp,mnt}
    cp /bin/busybox "$1/bin/busybox"
}

# QEMU machine of every TCG L1, without the legacy PIC. With it, Debian's 6.1.0-57 took a
# hardware interrupt on vector 0 early in start_kernel in more than half of the boots (QEMU
# -d int: "Servicing hardware INT=0x00"; an unprogrammed PIC's vector base is 0), which the
# kernel reads as a divide error and panics. Linux routes interrupts through the IOAPIC
# anyway; without the PIC 10 boots of 10 were clean.
L1_MACHINE=microvm,pic=off

# The host's TSC rate: without it the TCG L1 kernel sometimes hangs before printing.
host_tsc_khz() {
    awk '/cpu MHz/{printf "%d", $4*1000; exit}' /proc/cpuinfo
}

# early_l1_panic <console-log>: whether L1's kernel panicked in its own start-up, before
# any init ran: the idle task died, or the panic's trace runs through start_kernel.
early_l1_panic() {
    grep -q 'Kernel panic - not syncing' "$1" &&
        grep -qE 'Attempted to kill the idle task|[^_]start_kernel\+|x86_64_start_kernel' "$1"
}

# run_l1 <outer-initramfs> <console-log> <timeout-s> [idle-s]: boots L1 (the Debian kernel
# under QEMU TCG with SVM) and waits for it to power off. A silent L1 (no output in 60 s, or
# gone within 10 s without output) is killed and retried, up to three boots in all, and a
# retry is reported. Some boots stay
# silent for minutes on this machine, several in a row, with no known cause yet;
# NESTED_KERNEL_DEBUG="loglevel=7" replaces "quiet" to see how far such a kernel gets. With idle-s, an L1 whose console then
# stops growing for idle-s seconds is taken as hung, killed, and run_l1 returns 2.
# NESTED_QEMU_ARGS (a bash array, if set) adds QEMU options, e.g. a NIC; NESTED_QEMU_NETNS
# runs QEMU in that network namespace (for a NIC on one of its TAPs, see tap_netns).
run_l1() {
    local initrd=$1 console=$2 timeout_s=$3 idle_s=${4:-0} attempt size last_size idle
    # A large initramfs takes TCG a while to unpack before L1's init prints anything.
    local silent_s=${NESTED_SILENT_S:-60}
    for attempt in 1 2 3; do
        : > "$console"
        ${NESTED_QEMU_NETNS:+ip netns exec "$NESTED_QEMU_NETNS"} \
        timeout "$timeout_s" qemu-system-x86_64 -M "$L1_MACHINE" -accel tcg -cpu max -smp 1 -m 3072 \
            -display none -serial "file:$console" -monitor none -no-reboot \
            -kernel "$VMLINUX" -initrd "$initrd" \
            -append "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 ${NESTED_KERNEL_DEBUG:-quiet} tsc_early_khz=$(host_tsc_khz)" \
            ${NESTED_QEMU_ARGS[@]+"${NESTED_QEMU_ARGS[@]}"} 2> "$console.qemu-stderr" &
        local qemu=$! waited=0
        last_size=0; idle=0
        while kill -0 $qemu 2>/dev/null; do
            sleep 1; waited=$((waited + 1))
            if [ $waited -eq "$silent_s" ] && [ ! -s "$console" ]; then
                log "L1 printed nothing in $silent_s s (attempt $attempt); killing it"
                kill $qemu 2>/dev/null; wait $qemu 2>/dev/null
                continue 2
            fi
            size=$(stat -c %s "$console" 2>/dev/null || echo 0)
            if [ "$size" != "$last_size" ]; then last_size=$size; idle=0; else idle=$((idle + 1)); fi
            # An L1 whose ACPI tables did not survive a large initrd (see pack_initramfs)
            # cannot power off and halts instead; QEMU would then wait for the timeout.
            if [ $idle -ge 3 ] && tail -n 1 "$console" | grep -q 'reboot: System halted'; then
                log "L1 halted instead of powering off; stopping its QEMU"
                kill $qemu 2>/dev/null; wait $qemu 2>/dev/null
                return 0
            fi
            if [ "$idle_s" -gt 0 ] && [ "$size" -gt 0 ] && [ $idle -ge "$idle_s" ]; then
                log "L1 printed nothing for $idle_s s after $waited s (hung?); killing it"
                kill $qemu 2>/dev/null; wait $qemu 2>/dev/null
                return 2
            fi
        done
        wait $qemu || log "L1 QEMU exited with status $?"
        # Seen once in CI: QEMU gone after a second, nothing on the console (an early
        # reset, which -no-reboot turns into an exit). Booted again like a silent L1.
        if [ ! -s "$console" ] && [ $waited -le 10 ]; then
            log "L1 ended after $waited s without a word (attempt $attempt); booting it again"
            # What a later look needs: QEMU's own words, and whether memory or disk ran out.
            sed 's/^/[nested]   qemu: /' "$console.qemu-stderr" >&2
            log "  initrd $(stat -c %s "$initrd") bytes; $(free -m | awk '/^Mem:/{print $7}') MiB available;" \
                "$(df -h --output=avail "$(dirname "$console")" | tail -1 | tr -d ' ') free on disk"
            continue
        fi
        # Seen once in CI: L1's kernel oopsed in start_kernel under TCG (RIP in
        # __x86_return_thunk, "Attempted to kill the idle task") a quarter second in, on a
        # boot that passes every other time. Such a kernel never ran anything of ours, so
        # it is booted again like a silent L1; its oops stays in the log for a later look.
        if early_l1_panic "$console"; then
            log "L1's kernel panicked before starting init (attempt $attempt); booting it again"
            grep -m 12 -E 'BUG|WARNING|Oops|RIP|invalid opcode|general protection|panic' "$console" |
                sed 's/^/[nested]   L1: /' >&2
            continue
        fi
        [ -s "$console.qemu-stderr" ] && sed 's/^/[nested]   qemu: /' "$console.qemu-stderr" >&2
        [ "$attempt" != 1 ] && log "L1 needed $attempt boots (silent or panicked before)"
        return 0
    done
    log "L1 stayed silent three times"
    return 1
}

# tap_netns <namespace> <address/prefix>: a new network namespace with loopback up and a
# TAP "tap0" holding the address, for an L1 NIC (NESTED_QEMU_NETNS=<namespace>, QEMU
# option -netdev tap,ifname=tap0,script=no,downscript=no) and the services it is to reach
# (started with ip netns exec). Only this namespace and L1 ever see the address.
# Removed with `ip netns del <namespace>`.
tap_netns() {
    local ns=$1 addr=$2
    ip netns add "$ns" &&
        ip -n "$ns" link set lo up &&
        ip -n "$ns" tuntap add dev tap0 mode tap &&
        ip -n "$ns" addr add "$addr" dev tap0 &&
        ip -n "$ns" link set tap0 up
}

# copy_tgtd_into <root>: Debian's tgtd and tgtadm with their libraries, for a target in L1.
copy_tgtd_into() {
    copy_binary_with_libs tgtd "$1" && copy_binary_with_libs tgtadm "$1"
}

# tgtd_l1_script <iqn> <lun-file> [thin]: L1 init lines that start tgtd on L1's
# 127.0.0.1:3260 (loopback must be up) and export <lun-file> as LUN 1 of target <iqn> to
# every initiator, thin-provisioned (UNMAP) with "thin". The last line is one command
# chain: append "&& ..." or "|| ..." to act on whether the target is ready.
tgtd_l1_script() {
    local iqn=$1 file=$2 thin=${3:-}
    cat <<SCRIPT
mkdir -p /run/tgtd /var/run /var/lib /etc
tgtd -f --iscsi portal=127.0.0.1:3260 > /tgtd.log 2>&1 &
i=0; while ! tgtadm --lld iscsi --op show --mode sys >/dev/null 2>&1 && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i+1)); done
SCRIPT
    printf '%s' "tgtadm --lld iscsi --op new --mode target --tid 1 -T $iqn && tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b $file"
    if [ "$thin" = thin ]; then
        printf '%s' " && tgtadm --lld iscsi --op update --mode logicalunit --tid 1 --lun 1 --params thin_provisioning=1"
    fi
    printf '%s' " && tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL"
}

# ceph_behind_l1 <namespace> <address> <dir>: a throw-away Ceph cluster
# (scripts/ceph-cluster.sh, its files in <dir>) in a new network namespace, listening on
# <address> of the namespace's TAP (tap_netns, a /24) for an L1 whose NIC is that TAP.
# Stopped with `scripts/ceph-cluster.sh stop <dir>` and `ip netns del <namespace>`.
ceph_behind_l1() {
    local ns=$1 addr=$2 dir=$3
    tap_netns "$ns" "$addr/24" &&
        CEPH_CLUSTER_ADDR=$addr ip netns exec "$ns" "$REPO_ROOT/scripts/ceph-cluster.sh" start "$dir" >&2
}

# copy_ceph_client_into <root> <dir> [conf-line...]: what a client in L1 needs of the
# cluster in <dir>: /ceph/ceph.conf (its monitors, then each extra line) and
# /ceph/client.stratus.keyring.
copy_ceph_client_into() {
    local root=$1 dir=$2
    shift 2
    mkdir -p "$root/ceph"
    { echo "[global]"; grep '^mon host' "$dir/ceph.conf"; printf '%s\n' "$@"; } > "$root/ceph/ceph.conf"
    cp "$dir/client.stratus.keyring" "$root/ceph/"
}

# copy_librbd_into <root>: librbd (which stratus-vmm and QEMU's rbd driver load at run
# time) and every library it needs, at their paths here. With a dynamically linked program
# only: a static one cannot load it.
copy_librbd_into() {
    local root=$1 lib path
    lib=$(ldconfig -p | awk '$1 == "librbd.so.1" && /x86-64/ {print $NF; exit}')
    [ -n "$lib" ] || { log "librbd.so.1 not found (apt-get install librbd1)"; return 1; }
    for path in "$lib" $(ldd "$lib" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        mkdir -p "$root$(dirname "$path")"
        cp -L "$path" "$root$path"
    done
}

# copy_qemu_into <root> [module...]: the host's qemu-system-x86_64, its shared libraries
# and the firmware it loads, so benchmarks can run QEMU-KVM inside L1 next to stratus-vmm;
# and each named module (e.g. block-iscsi, block-rbd: package qemu-block-extra) with the
# libraries it needs, from QEMU's module directory.
copy_qemu_into() {
    local root=$1 qemu lib fw src module moddir=/usr/lib/x86_64-linux-gnu/qemu
    shift
    for module in "$@"; do
        [ -f "$moddir/$module.so" ] || { log "QEMU module $module not found (apt-get install qemu-block-extra)"; return 1; }
        for lib in "$moddir/$module.so" $(ldd "$moddir/$module.so" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do
            mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
        done
    done
    qemu=$(command -v qemu-system-x86_64)
    mkdir -p "$root/usr/bin" "$root/usr/share/qemu" "$root/lib64"
    cp "$qemu" "$root/usr/bin/"
    for lib in $(ldd "$qemu" | awk '/=> \//{print $3} /^\s*\/lib/{print $1}'); do
        mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
    done
    cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
    for fw in bios-256k.bin bios-microvm.bin kvmvapic.bin linuxboot_dma.bin pvh.bin; do
        src=$(ls /usr/share/qemu/$fw /usr/share/seabios/$fw 2>/dev/null | head -1 || true)
        [ -n "$src" ] || { log "QEMU firmware $fw not found"; return 1; }
        cp -L "$src" "$root/usr/share/qemu/"
    done
}

# make_stub_lib <binary> <soname> <dir>: writes <dir>/<soname>, a stand-in for a library
# <binary> links but a caller never exercises: same soname and symbol versions, and every
# symbol <binary> imports from it defined as a function that traps (SIGILL if ever called).
# It needs nothing itself, so the real library's dependencies stay out of a guest root.
make_stub_lib() {
    local bin=$1 soname=$2 dir=$3 real
    real=$(ldd "$bin" | awk -v s="$soname" '$1 == s && $3 ~ /^\// {print $3}')
    [ -n "$real" ] || { log "$bin does not link $soname"; return 1; }
    # What the library defines, as name@VERSION (and bare names for unversioned imports).
    nm -D --defined-only "$real" | awk 'NF == 3 {s = $3; sub(/@@/, "@", s); print s; sub(/@.*/, "", s); print s}' \
        | sort -u > "$dir/$soname.defs"
    nm -D --undefined-only "$bin" | awk '{print $2}' \
        | awk 'NR == FNR {d[$1]; next} ($1 in d)' "$dir/$soname.defs" - > "$dir/$soname.imports"
    [ -s "$dir/$soname.imports" ] || { log "$bin imports nothing from $soname"; return 1; }
    awk -F@ '{print "void " $1 "(void) { __builtin_trap(); }"}' "$dir/$soname.imports" > "$dir/$soname.c"
    # One version node per version the binary asks for; unversioned names go in the first.
    awk -F@ '{v = ($2 == "" ? "-" : $2); if (!(v in s)) order[++n] = v; s[v] = s[v] " " $1 ";"}
        END {
            first = 0; for (i = 1; i <= n; i++) if (order[i] != "-") { first = i; break }
            if (first == 0) { print "{ global:" s["-"] " local: *; };"; exit }
            for (i = 1; i <= n; i++) {
                v = order[i]; if (v == "-") continue
                extra = (i == first && ("-" in s)) ? s["-"] : ""
                print v " { global:" s[v] extra (i == first ? " local: *;" : "") " };"
            }
        }' "$dir/$soname.imports" > "$dir/$soname.map"
    cc -shared -fPIC -nostdlib -fno-builtin -w -o "$dir/$soname" -Wl,-soname,"$soname" \
        -Wl,--version-script="$dir/$soname.map" "$dir/$soname.c"
}

# copy_binary_with_libs <binary> <root> [stub-soname...]: copies <binary> to <root>/usr/bin
# with every shared library it loads (ldd), at the same paths, and the dynamic loader. Each
# stub soname is replaced by a make_stub_lib stand-in instead (for plug-ins the guest never
# uses whose libraries would pull in tens of MiB).
copy_binary_with_libs() {
    local bin=$1 root=$2 stubs soname path libdir
    shift 2
    bin=$(command -v "$bin") || { log "copy_binary_with_libs: $1 not found"; return 1; }
    stubs=$(mktemp -d "${NESTED_WORK:-/tmp}/stubs.XXXX")
    for soname in "$@"; do
        make_stub_lib "$bin" "$soname" "$stubs" || { rm -rf "$stubs"; return 1; }
    done
    mkdir -p "$root/usr/bin" "$root/lib64"
    cp -L "$bin" "$root/usr/bin/"
    libdir=$(dirname "$(ldd "$bin" | awk '$1 == "libc.so.6" {print $3}')")
    while read -r soname path; do
        case $path in
            "$stubs"/*) mkdir -p "$root$libdir"; cp "$path" "$root$libdir/$soname" ;;
            /*) mkdir -p "$root$(dirname "$path")"; cp -L "$path" "$root$path" ;;
            *) log "copy_binary_with_libs: $bin needs $soname, which ldd cannot find"; rm -rf "$stubs"; return 1 ;;
        esac
    done < <(LD_LIBRARY_PATH=$stubs ldd "$bin" | awk '$2 == "=>" {print $1, $3}')
    cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
    rm -rf "$stubs"
}

# Libraries Debian's fio links only for engines the nested guests never use (GlusterFS,
# NBD, RDMA, Ceph, PMEM): with them fio and its libraries are ~84 MiB (36 MiB gzipped),
# without them ~5 MiB (2 MiB gzipped).
FIO_STUB_LIBS="libgfapi.so.0 libnbd.so.0 libibverbs.so.1 librdmacm.so.1 librados.so.2 librbd.so.1 libpmemblk.so.1 libpmem.so.1"

# copy_fio_into <root>: Debian's fio (package fio) and what it needs, with FIO_STUB_LIBS
# stubbed; checks that it starts in <root>.
copy_fio_into() {
    # shellcheck disable=SC2086
    copy_binary_with_libs fio "$1" $FIO_STUB_LIBS || return 1
    chroot "$1" /usr/bin/fio --version >/dev/null || { log "fio does not start in $1"; return 1; }
}
