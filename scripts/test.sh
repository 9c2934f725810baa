#!/bin/bash
# The whole test suite, from a fresh Debian 12 machine: installs what the tests need,
# checks formatting and lints, runs every crate's tests (device tests, /dev/kvm tiny
# guests, contextualizer images read back by real tools), then boots real Linux on
# stratus-vmm in the nested harness.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step shows the disk space left (a full disk fails in ways that name something else)
# and the minutes since the start; the steps' durations are listed at the end, also when a
# step fails, so a slow CI machine's log says where its time went.
suite_started=$(date +%s)
step_started=$suite_started
step_name=""
step_times=()
end_step() {
    local now
    now=$(date +%s)
    [ -n "$step_name" ] && step_times+=("$(printf '%5d s  %s' $((now - step_started)) "$step_name")")
    step_started=$now
}
step() {
    end_step
    step_name=$*
    echo
    echo "=== $* === ($(df -h --output=avail . | tail -1 | tr -d ' ') free," \
        "$((($(date +%s) - suite_started) / 60)) min in)"
}
durations() {
    local status=$?
    end_step
    step_name=""
    echo
    echo "=== durations (exit $status) ==="
    printf '%s\n' "${step_times[@]}"
    printf '%5d s  total\n' $(($(date +%s) - suite_started))
}
trap durations EXIT
step "install what the tests need"
bash scripts/install-deps.sh scripts/test-packages.txt scripts/runtime-packages.txt
# One build from scratch: incremental caches would only double what the disk holds.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "a Debian root for the tests that boot one, made in the background (mostly downloading)"
mkdir -p target
bash scripts/debian-root.sh > target/debian-root.out 2>&1 &

step "external tools found"
bash scripts/tool-versions.sh
step "install-deps.sh's own check"
bash scripts/tests/install_deps.sh
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
step "cargo test"
cargo test --workspace 2>&1 | tee target/cargo-test.log
step "fuzz: every libFuzzer target (fuzz/) for 10 s from its checked-in seeds"
bash scripts/fuzz.sh 10
# The instrumented build takes ~4 GiB that the nested steps may need on a small CI disk;
# locally it is kept, so the next run only rebuilds what changed.
if [ "${CI:-}" = true ]; then rm -rf target/fuzz; fi
step "nested: Debian kernel on stratus-vmm (QEMU-TCG L1, nested SVM)"
bash vmm/tests/nested/boot_debian.sh
step "nested: iSCSI (tgtd in L1), host block device and RBD (Ceph behind L1's NIC) disks under Debian, fio-verified on both sides"
bash vmm/tests/nested/network_disks.sh
step "nested: the packaged systemd unit under a real systemd (debootstrapped Debian L1): start, VM, restart, kill -9"
bash nodeagent/tests/nested/systemd_host.sh
step "nested: the cloud with a node agent in a real second host (L1), booting Debian from a Marketplace image"
bash orchestrator/tests/nested/cloud_in_l1.sh
step "nested: StratusLab's tutorial through the stratus-* commands on the cloud in one box (scripts/demo.sh)"
bash orchestrator/tests/nested/tutorial.sh
