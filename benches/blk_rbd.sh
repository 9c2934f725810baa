#!/bin/bash
# virtio-blk on Ceph RBD at the device level: stratus-vmm's queue worker and librbd engine
# (a simulated driver through real virtqueues, `stratus-bench blk-rbd`) against fio's own
# rbd engine, on the same image of a throw-away single-node cluster on loopback
# (scripts/ceph-cluster.sh: one monitor, one memstore OSD held in memory), alternated.
# Both are clients of the same daemons on the same two cores, so the ratio compares the
# clients; the absolute figures are this machine's loopback and memstore, not a real cluster.
#
# usage: benches/blk_rbd.sh [runs] [ms-per-job] [image-MiB]   (prints a Markdown table)
set -euo pipefail
RUNS=${1:-3}
MS=${2:-3000}
MIB=${3:-512}
cd "$(dirname "$0")/.."
cargo build --release --quiet -p stratus-benches
DIR=$(mktemp -d "${TMPDIR:-/tmp}/stratus-blk-rbd.XXXX")
trap 'bash scripts/ceph-cluster.sh stop "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
# The image's data lives in the OSD's memory: room for it and some to spare.
CEPH_CLUSTER_MEMSTORE_BYTES=$(((MIB + 512) << 20)) bash scripts/ceph-cluster.sh start "$DIR" >&2
# librbd's cache off for both clients: fio never flushes, so its cache would stay in the
# writethrough-until-flush mode or not depending on the engine's habits, not the client's
# efficiency; both clients are measured going to the OSD for every request.
CONF=$DIR/bench.conf
{ cat "$DIR/ceph.conf"; printf '\n[client]\nrbd cache = false\n'; } >"$CONF"
rbd -c "$CONF" create --size "${MIB}M" rbd/bench
# Written once all over, so reads find data rather than absent objects.
rbd -c "$CONF" bench --io-type write --io-size 4M --io-threads 4 --io-pattern seq \
    --io-total "${MIB}M" rbd/bench >/dev/null
target/release/stratus-bench blk-rbd --image rbd/bench --conf "$CONF" --runs "$RUNS" --runtime-ms "$MS"
