#!/usr/bin/env bash
# bench/all.sh — every figure in docs/benchmarks.md, in one run on this
# machine, so they can be compared as ratios: Surge on one node; Surge on the
# five-voter, two-zone cluster with its DR replica (every voter fsyncs every
# entry) at its peak and paced to half the peak; Redis and PostgreSQL
# (bench/compare.sh); and how long checkout is unavailable when the leader's
# zone is cut off, and during a switchover and a failback (the demo's
# drills). Release build. Results go to target/bench/.
#
# Usage: bench/all.sh [--seconds S] [--no-install]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=10
compare_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds)    seconds="${2:?--seconds needs a value}"; shift 2 ;;
        --no-install) compare_args+=(--no-install); shift ;;
        *)            echo "usage: $0 [--seconds S] [--no-install]" >&2; exit 2 ;;
    esac
done

out=target/bench
mkdir -p "$out"
cargo build --release --locked -q
surge=target/release/surge
field() { sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" "$2" | head -n 1; }

echo "== one node"
"$surge" bench --seconds "$seconds" --summary-json "$out/single.json"
echo "== five-voter cluster, flat out"
"$surge" bench --cluster --clients 256 --seconds "$seconds" --summary-json "$out/cluster-peak.json"
half=$(awk -v peak="$(field throughput_per_s "$out/cluster-peak.json")" 'BEGIN { printf "%d", peak / 2 }')
echo "== five-voter cluster, paced to half its peak ($half/s)"
"$surge" bench --cluster --clients 256 --rate "$half" --seconds "$seconds" --summary-json "$out/cluster-half.json"
echo "== references"
bash bench/compare.sh "${compare_args[@]}" --seconds "$seconds" --json "$out/compare.json" \
    --surge-json "$out/single.json" --surge-json "$out/cluster-peak.json" --surge-json "$out/cluster-half.json"
echo "== zone-loss drill during a sale (the leader's zone cut off for 5 s), then a switchover and a failback"
"$surge" demo --exit --duration 20 --drill-seconds 5 --summary-json "$out/demo.json" | grep -E "zone_loss|switchover_|Demo|FAIL"
echo "zone_loss_unavailable_ms = $(field zone_loss_unavailable_ms "$out/demo.json")"
