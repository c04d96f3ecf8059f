#!/usr/bin/env bash
# `make bench-cluster`: the cost of replication on the ingest path. In one run on this machine:
#   1. one nats-server, EVENTS at R1;
#   2. a 3-node JetStream cluster on loopback, EVENTS at R3;
# each with one release ingestor, measuring the acknowledged events/s in a closed loop and the ack
# latency at a fixed rate (open loop). Acknowledged means stored by JetStream (on a quorum at R3),
# which is what the replication changes; ClickHouse and the aggregators are not involved (their
# side is `make bench`). Then, on each topology, the raw JetStream publish ceiling of the same
# payloads (`loadtest ceiling --only jetstream`) into one stream and into four (the 16 partitions
# spread over them, each stream its own Raft group with its own leader): does a multi-stream
# layout raise the R3 ceiling? Writes bench/results/<date>-cluster.json and prints a table with
# the R3/R1 ratios and the load average.
#
# Knobs (environment): CHUTE_BENCH_MAX_SECONDS (closed loop, default 20),
# CHUTE_BENCH_RATE_SECONDS (fixed rate, default 15), CHUTE_BENCH_RATE (default 10000),
# CHUTE_BENCH_CONCURRENCY (closed-loop workers, default 8), CHUTE_BENCH_CEILING_ROWS (events
# published per JetStream ceiling, default 1000000), CHUTE_BENCH_KEEP=1 keeps the temp dir.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
BIN="$ROOT/target/release"
export RUST_LIB_BACKTRACE=0
MAX_SECONDS="${CHUTE_BENCH_MAX_SECONDS:-20}"
RATE_SECONDS="${CHUTE_BENCH_RATE_SECONDS:-15}"
RATE="${CHUTE_BENCH_RATE:-10000}"
CONCURRENCY="${CHUTE_BENCH_CONCURRENCY:-8}"
CEILING_ROWS="${CHUTE_BENCH_CEILING_ROWS:-1000000}"

log() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
die() { printf '\033[1;31mxx\033[0m %s\n' "$*" >&2; exit 1; }
command -v nats-server >/dev/null || die "nats-server missing: run 'make deps'"
[[ -x "$PY" ]] || die "$PY missing: run 'make deps'"

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p chute-ingestor -p chute-loadtest)

WORK="$(mktemp -d -t chute-bench-cluster-XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ "${CHUTE_BENCH_KEEP:-0}" == 1 ]] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  die "nothing listens on $1 (logs in $WORK)"
}
wait_ready() {
  for _ in $(seq 1 600); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  die "$1 not ready (logs in $WORK)"
}
start() { local name="$1"; shift; "$@" >>"$WORK/$name.log" 2>&1 & PIDS+=($!); }
stop_all() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

# nats_node NAME PORT [ROUTE_PORT ROUTES]: a config file with an explicit max_file_store.
nats_node() {
  local name="$1" port="$2" conf="$WORK/$1.conf"
  printf 'server_name: %s\nlisten: 127.0.0.1:%s\njetstream {\n  store_dir: "%s"\n  max_file_store: 64GB\n}\n' \
    "$name" "$port" "$WORK/$name" >"$conf"
  if [[ $# -gt 2 ]]; then
    printf 'cluster {\n  name: bench\n  listen: 127.0.0.1:%s\n  routes: [%s]\n}\n' "$3" "$4" >>"$conf"
  fi
  start "$name" nats-server -c "$conf"
}

# measure LABEL NATS_URLS REPLICAS: one ingestor, then the closed loop and the fixed rate.
measure() {
  local label="$1" urls="$2" replicas="$3"
  local grpc admin
  grpc="127.0.0.1:$(free_port)"; admin="127.0.0.1:$(free_port)"
  start "ingestor-$label" "$BIN/ingestor" --nats-url "$urls" --grpc-listen "$grpc" --admin-listen "$admin" \
    --otlp-grpc-listen off --otlp-http-listen off --stream-replicas "$replicas" --stream-max-bytes 8GiB --log warn
  wait_ready "http://$admin/readyz"
  local common=(--grpc "$grpc" --endpoints-file /dev/null --no-verify --live off --no-progress)
  log "$label: closed loop, $CONCURRENCY workers, ${MAX_SECONDS}s"
  "$BIN/loadtest" run "${common[@]}" --mode closed --concurrency "$CONCURRENCY" --duration "${MAX_SECONDS}s" \
    --label "$label-closed" --out "$WORK/$label-closed.json" >"$WORK/$label-closed.txt"
  log "$label: open loop at $RATE events/s, ${RATE_SECONDS}s"
  "$BIN/loadtest" run "${common[@]}" --mode open --rate "$RATE" --duration "${RATE_SECONDS}s" \
    --label "$label-open" --out "$WORK/$label-open.json" >"$WORK/$label-open.txt"
  local streams
  for streams in 1 4; do
    log "$label: JetStream publish ceiling, $CEILING_ROWS events into $streams stream(s) at R$replicas"
    "$BIN/loadtest" ceiling --endpoints-file /dev/null --nats-url "$urls" --only jetstream --rows "$CEILING_ROWS" \
      --jetstream-streams "$streams" --jetstream-replicas "$replicas" --timeout 120s \
      --out "$WORK/$label-ceiling-$streams.json" >/dev/null
  done
}

log "single node, EVENTS at R1"
port="$(free_port)"
nats_node n0 "$port"
wait_port "$port"
measure r1 "nats://127.0.0.1:$port" 1
stop_all

log "3-node cluster, EVENTS at R3"
declare -a ports routes
for i in 1 2 3; do ports[$i]="$(free_port)"; routes[$i]="$(free_port)"; done
route_list="nats-route://127.0.0.1:${routes[1]}, nats-route://127.0.0.1:${routes[2]}, nats-route://127.0.0.1:${routes[3]}"
for i in 1 2 3; do nats_node "n$i" "${ports[$i]}" "${routes[$i]}" "$route_list"; done
for i in 1 2 3; do wait_port "${ports[$i]}"; done
for _ in $(seq 1 300); do grep -qh "metadata leader" "$WORK"/n[123].log 2>/dev/null && break; sleep 0.1; done
measure r3 "nats://127.0.0.1:${ports[1]},nats://127.0.0.1:${ports[2]},nats://127.0.0.1:${ports[3]}" 3
stop_all

mkdir -p "$ROOT/bench/results"
OUT="$ROOT/bench/results/$(date -u +%Y-%m-%dT%H-%M-%SZ)-cluster.json"
"$PY" - "$WORK" "$OUT" <<'PY'
import json, os, sys
work, out = sys.argv[1], sys.argv[2]
def run(name):
    with open(os.path.join(work, name + ".json")) as f:
        return json.load(f)
rows = {}
for r in ("r1", "r3"):
    closed, open_ = run(r + "-closed"), run(r + "-open")
    rows[r] = {
        "closed_events_per_s": closed["achieved_rate"],
        "closed_ack_p99_ms": closed["ack_latency"]["p99_ms"],
        "closed_failed_events": closed["events"]["failed"],
        "open_rate": open_["target_rate"],
        "open_achieved_rate": open_["achieved_rate"],
        "open_ack_p50_ms": open_["ack_latency"]["p50_ms"],
        "open_ack_p99_ms": open_["ack_latency"]["p99_ms"],
    }
ceilings = {}
for r in ("r1", "r3"):
    for streams in (1, 4):
        c = run(f"{r}-ceiling-{streams}")
        ceilings[f"{r}_{streams}_streams"] = {
            "events_per_s": c["jetstream_events_per_second"],
            "mib_per_s": c["jetstream_mib_per_second"],
            "streams": c["jetstream_streams"],
            "replicas": c["jetstream_replicas"],
        }
result = {
    "date": os.path.basename(out)[:20],
    "jetstream_ceiling": ceilings,
    "r3_four_over_one_stream": ceilings["r3_4_streams"]["events_per_s"] / ceilings["r3_1_streams"]["events_per_s"],
    "load_average": os.getloadavg(),
    "cpus": os.cpu_count(),
    "r1": rows["r1"],
    "r3": rows["r3"],
    "r3_over_r1_throughput": rows["r3"]["closed_events_per_s"] / rows["r1"]["closed_events_per_s"],
    "r3_over_r1_ack_p99_at_rate": rows["r3"]["open_ack_p99_ms"] / max(rows["r1"]["open_ack_p99_ms"], 1e-9),
}
with open(out, "w") as f:
    json.dump(result, f, indent=1)
print()
print("| stream | closed loop events/s | ack p99 (closed) | ack p50 / p99 at %d/s |" % rows["r1"]["open_rate"])
print("|---|---|---|---|")
for r, name in (("r1", "1 node, R1"), ("r3", "3 nodes, R3")):
    x = rows[r]
    print(f"| {name} | {x['closed_events_per_s']:,.0f} | {x['closed_ack_p99_ms']:.1f} ms | "
          f"{x['open_ack_p50_ms']:.1f} / {x['open_ack_p99_ms']:.1f} ms |")
print()
print("| JetStream publish ceiling (same payloads, 512 PubAcks outstanding) | 1 stream | 4 streams | 4 / 1 |")
print("|---|---|---|---|")
for r, name in (("r1", "1 node, R1"), ("r3", "3 nodes, R3")):
    one, four = ceilings[f"{r}_1_streams"]["events_per_s"], ceilings[f"{r}_4_streams"]["events_per_s"]
    print(f"| {name} | {one:,.0f} events/s | {four:,.0f} events/s | {four / one:.2f} |")
print()
print(f"R3/R1 throughput: {result['r3_over_r1_throughput']:.2f}; "
      f"R3/R1 ack p99 at {rows['r1']['open_rate']:.0f}/s: {result['r3_over_r1_ack_p99_at_rate']:.2f}; "
      f"load average {result['load_average'][0]:.2f} on {result['cpus']} cores")
print(f"written to {out}")
PY
