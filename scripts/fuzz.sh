#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with coverage instrumentation on stable Rust and
# runs each for a while on a copy of its checked-in seed corpus.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   default: 30 s, every target
#   scripts/fuzz.sh --campaign [TARGET...]              10^7 executions per target
#                                                       (FUZZ_CAMPAIGN_RUNS=N: N instead)
#   scripts/fuzz.sh --build-only [--campaign]           build and stop
#
# Short runs use fuzz/Cargo.toml's unoptimised `smoke` profile (it builds in less than
# half the time); a campaign uses the optimised release profile.
#
# Prints one line per target, `fuzz <target>: <execs> execs, <cov> cov, <n> crashes`, and
# exits non-zero when a target crashed (a panic, an arithmetic overflow, a hang of more
# than 10 s or more than 2 GiB of memory), naming the input that did it. FUZZ_TIMEOUT_S=N
# sets the hang limit: blk_request's disk file is real, and on a machine busy with builds
# one fsync can take longer than 10 s (a campaign next to a build saw it). Reproduce one
# with `target/fuzz/x86_64-unknown-linux-gnu/<smoke|release>/<target> <artifact>`.
#
# Stable rustc has no -Zsanitizer: the Rust code is memory safe, what is looked for is
# panics, overflows, hangs and runaway allocations. The flags below are cargo-fuzz's set
# without AddressSanitizer; debug assertions and overflow checks are on in fuzz/Cargo.toml's
# release profile and the smoke profile that inherits it.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR="$root/target/fuzz"
# RUSTFLAGS reach only the target's crates when --target is given; without it build
# scripts and proc macros would be instrumented too and fail to link.
triple=$(rustc -vV | sed -n 's/^host: //p')

all_targets=(blk_request net_tx net_rx pci_config api_json marketplace_xml dhcp context)

# Longest input per target: guest memory images need room for rings and descriptors; the
# text formats are small documents.
max_len() {
    case "$1" in
        blk_request | net_tx | net_rx) echo 16384 ;;
        pci_config) echo 4096 ;;
        marketplace_xml) echo 16384 ;;
        *) echo 4096 ;;
    esac
}

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

seconds=30
campaign=false
build_only=false
targets=()
for arg in "$@"; do
    case "$arg" in
        --campaign) campaign=true ;;
        --build-only) build_only=true ;;
        -h | --help) usage ;;
        *[!0-9]*)
            if [[ " ${all_targets[*]} " != *" $arg "* ]]; then
                echo "fuzz.sh: unknown target '$arg' (targets: ${all_targets[*]})" >&2
                exit 2
            fi
            targets+=("$arg")
            ;;
        *) seconds=$arg ;;
    esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=("${all_targets[@]}")
profile=smoke
$campaign && profile=release
bin_dir="$CARGO_TARGET_DIR/$triple/$profile"

export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"

started=$(date +%s)
cargo build --profile "$profile" --manifest-path "$root/fuzz/Cargo.toml" --target "$triple" --bins
echo "fuzz: build took $(($(date +%s) - started)) s"
$build_only && exit 0

failed=0
for target in "${targets[@]}"; do
    seeds="$root/fuzz/corpus/$target"
    work="$CARGO_TARGET_DIR/corpus-run/$target"
    artifacts="$CARGO_TARGET_DIR/artifacts/$target"
    log="$CARGO_TARGET_DIR/logs/$target.log"
    mkdir -p "$work" "$artifacts" "$(dirname "$log")"
    # libFuzzer adds what it finds to the first corpus directory: a copy, so the
    # checked-in seeds only change by hand.
    cp -n "$seeds"/* "$work"/ 2>/dev/null || true
    if $campaign; then
        limit=(-runs="${FUZZ_CAMPAIGN_RUNS:-10000000}")
    else
        limit=(-max_total_time="$seconds")
    fi
    set +e
    "$bin_dir/$target" "$work" \
        "${limit[@]}" \
        -max_len="$(max_len "$target")" \
        -rss_limit_mb=2048 \
        -timeout="${FUZZ_TIMEOUT_S:-10}" \
        -print_final_stats=1 \
        -artifact_prefix="$artifacts/" \
        >"$log" 2>&1
    status=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | sed 's/cov: //')
    # A "slow unit" is only a report (libFuzzer writes one past 10 s, as when the run was
    # stopped and continued); a unit that really hangs is a timeout, written as timeout-*.
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | grep -v '/slow-unit-' | tail -n 1 || true)
    if [[ $status -eq 0 && -z "$artifact" ]]; then
        echo "fuzz $target: ${execs:-0} execs, ${cov:-0} cov, 0 crashes"
    else
        failed=1
        echo "fuzz $target: ${execs:-0} execs, ${cov:-0} cov, 1 crashes (exit $status):" \
            "${artifact:-no artifact written}; log $log"
        grep -m 3 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | sed 's/^/    /' || true
    fi
done
exit $failed
