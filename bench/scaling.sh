#!/usr/bin/env bash
# Per-core scaling of percore on one machine: the numbers in docs/benchmarks.md
# ("Per-core scaling"). Needs release builds of `percore` and `percore-bench`.
#
#   bench/scaling.sh [BIN_DIR] [OUT_DIR]
#
# BIN_DIR defaults to target/release, OUT_DIR to target/scaling. Environment:
#   SHARDS="1 2 4 8 14"   shard counts (one core each; counts above the online cores are skipped)
#   DURATION_S=5 WARMUP_S=1
#   SOAK_S=120            seconds of the 50 %-of-peak soak at the end (0: none)
#   DATA=...              data directory on a disk that supports O_DIRECT (not tmpfs)
#
# Rows:
#   single   --replicas 1: one node, n shards on cores 0..n-1 (journal, fdatasync per commit)
#   shared   --replicas 3 on cores 0..n-1 (three replicas share the n cores: 3n shards)
#   spread   --replicas 3 --replica-core-stride n: each replica on n cores of its own (3n cores)
#   threads  percore-bench threads (1 to 1,024 producers into one consumer)
#   rings    percore-bench rings --filter mpmc (incl. two pinned producers, push only)
#   spare    spread n=4 with 64 MiB segments, without and with --segment-spare, twice
#            interleaved (10 s each): does zero-filling the next segment ahead pay here?
#   soak     3 replicas x 4 shards on 12 cores (4 left to the checkpoint followers and the
#            client: each replica runs on its shard cores plus those 4), --load 0.5 for SOAK_S
#            seconds with the per-second series (JSON) and plot. A 10-minute soak
#            (SOAK_S=600) runs past a 10-minute command limit with the peak and warm-up:
#            bench/lease.sh starts it detached and collects it in a second command.
set -uo pipefail

bin=${1:-target/release}
out=${2:-target/scaling}
shards=${SHARDS:-1 2 4 8 14}
duration=${DURATION_S:-5}
warmup=${WARMUP_S:-1}
soak_s=${SOAK_S:-120}
data=${DATA:-$PWD/target/scaling-data}
mkdir -p "$out" "$data"
online=$(nproc)

{
    echo "date: $(date -u +%FT%TZ)"
    echo "online cores: $online"
    lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Socket|NUMA node\(s\)|L3' || true
    echo "memlock: $(ulimit -l)"
    df -hT "$data" | tail -1
} | tee "$out/machine.txt"

cores_list() { seq -s, 0 $(($1 - 1)); }

row() { # name n args...
    local name=$1 n=$2
    shift 2
    echo "== $name n=$n: percore bench $*" >&2
    "$bin/percore" bench --duration-s "$duration" --warmup-s "$warmup" --json \
        --data-dir "$data/$name-$n" "$@" >"$out/$name-$n.json" 2>"$out/$name-$n.log"
    local rc=$?
    rm -rf "${data:?}/$name-$n"
    [ $rc -eq 0 ] || { echo "   failed ($rc): $(tail -3 "$out/$name-$n.log")" >&2; return; }
    python3 - "$out/$name-$n.json" "$name" "$n" <<'EOF' >&2
import json, sys
r = json.load(open(sys.argv[1]))
n = int(sys.argv[3])
tps = r["total_committed_tx_per_s"]
req = r.get("request_latency_us") or {}
commit = r.get("commit_latency_us") or {}
print(f"   {sys.argv[2]:6} n={n:2}: {tps / 1e3:9.0f}k tx/s, {tps / n / 1e3:7.0f}k per shard; "
      f"request p50/p99 {req.get('p50')}/{req.get('p99')} us; commit p99 <= {commit.get('p99_at_most')} us")
EOF
}

for n in $shards; do
    [ "$n" -le "$online" ] || continue
    row single "$n" --replicas 1 --cores "$(cores_list "$n")"
done
for n in $shards; do
    [ "$n" -le "$online" ] || continue
    row shared "$n" --replicas 3 --cores "$(cores_list "$n")"
done
for n in $shards; do
    [ $((3 * n)) -le "$online" ] || continue
    row spread "$n" --replicas 3 --cores "$(cores_list "$n")" --replica-core-stride "$n"
done

if [ "$online" -ge 12 ]; then
    for round in 1 2; do
        for spare in off on; do
            flag=()
            [ "$spare" = on ] && flag=(--segment-spare)
            duration=10 row "spare-$spare-$round" 4 --replicas 3 --cores 0,1,2,3 \
                --replica-core-stride 4 --segment-mib 64 "${flag[@]}"
        done
    done
fi

echo "== threads" >&2
"$bin/percore-bench" threads >"$out/threads.txt" 2>&1
tail -4 "$out/threads.txt" >&2
echo "== rings --filter mpmc (two producers on two cores, the claim back-off)" >&2
"$bin/percore-bench" rings --filter mpmc >"$out/rings-mpmc.txt" 2>&1
grep -E "push_only|2P/2C" "$out/rings-mpmc.txt" >&2

if [ "$soak_s" -gt 0 ] && [ "$online" -ge 16 ]; then
    echo "== soak: 3 x 4 shards on 12 cores, --load 0.5, ${soak_s}s" >&2
    "$bin/percore" bench --replicas 3 --cores 0,1,2,3 --replica-core-stride 4 \
        --load 0.5 --peak-s 5 --warmup-s 5 --duration-s "$soak_s" --series --json \
        --segment-mib 256 --plot "$out/soak.svg" --data-dir "$data/soak" \
        >"$out/soak.json" 2>"$out/soak.log"
    echo "   rc=$?" >&2
    grep -E 'RSS|gap|p999|p99|committed' "$out/soak.log" | tail -12 >&2
    rm -rf "${data:?}/soak"
fi
echo "done" >&2
