#!/usr/bin/env bash
# The router's CPU per event with 10, 100 and 1,000 rules (issue 17; part of `make bench`).
#
# nats-server and an ingestor on free loopback ports in a temp dir, then for each rule count a
# fresh router (its own consumer) with a generated rules file, and the load generator at a fixed
# rate. CPU per event = the router's user + system CPU time (/proc/<pid>/stat) over the events it
# evaluated (chute_router_events_total), both taken from the same window. The rules are a mix of
# exact-name, prefix and catch-all matches over the load's 50 event names; a tenth route, the
# rest are threshold and anomaly rules (windows and baselines updated per matching event).
#
# Knobs: CHUTE_BENCH_ROUTER_RATE (events/s, default 20000), CHUTE_BENCH_ROUTER_SECONDS (default
# 15), CHUTE_BENCH_ROUTER_RULES (default "10 100 1000"). Writes bench/results/router-<date>.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
BIN="$ROOT/target/release"
RATE="${CHUTE_BENCH_ROUTER_RATE:-20000}"
SECONDS_PER_RUN="${CHUTE_BENCH_ROUTER_SECONDS:-15}"
COUNTS="${CHUTE_BENCH_ROUTER_RULES:-10 100 1000}"
export RUST_LIB_BACKTRACE=0

log() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
die() { printf '\033[1;31mxx\033[0m %s\n' "$*" >&2; exit 1; }
command -v nats-server >/dev/null || die "nats-server missing: run 'make deps'"

log "building release binaries (ingestor, router, loadtest)"
(cd "$ROOT" && cargo build --release -q -p chute-ingestor -p chute-router -p chute-loadtest)

WORK="$(mktemp -d /tmp/chute-bench-router.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 1 $(($2 * 10))); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  die "$1 did not answer within $2 s"
}
metric() { curl -fsS "$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
metric_sum() { curl -fsS "$1/metrics" | awk -v m="$2{" 'index($1, m) == 1 {s += $2} END {printf "%d", s}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

NATS_PORT="$(free_port)"
nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/js" >"$WORK/nats.log" 2>&1 &
PIDS+=($!)
GRPC="127.0.0.1:$(free_port)" ADMIN="127.0.0.1:$(free_port)"
"$BIN/ingestor" --nats-url "nats://127.0.0.1:$NATS_PORT" --grpc-listen "$GRPC" --admin-listen "$ADMIN" \
  --otlp-grpc-listen off --otlp-http-listen off --stream-max-bytes 4GiB --log warn >"$WORK/ingestor.log" 2>&1 &
PIDS+=($!)
wait_http "http://$ADMIN/readyz" 30

# rules_file N: N rules over the load's event names llm.request.0 .. llm.request.49.
rules_file() {
  local n="$1" i name kind
  echo "rules:"
  for ((i = 0; i < n; i++)); do
    case $((i % 10)) in
      0 | 1 | 2 | 3 | 4 | 5) name="llm.request.$(((i * 7) % 100))" ;;
      6 | 7) name="\"llm.request.$(((i * 3) % 5))*\"" ;;
      8) name="\"*.request.1?\"" ;;
      *) name="\"*\"" ;;
    esac
    echo "  - name: rule_$i"
    case $((i % 10)) in
      # Route rules are narrow (latency_ms is uniform in 1..4000: about 1% of their events).
      0) echo "    match: { event: $name, metrics: [\"latency_ms > 3960\"] }" ; echo "    route: {}" ;;
      *) echo "    match: { event: $name }" ;;
    esac
    case $((i % 10)) in
      0) ;;
      1 | 2 | 3 | 4) echo "    threshold: { value: p99(latency_ms), window: 5m, above: 3900, group_by: attr_0 }" ;;
      5 | 6) echo "    threshold: { value: rate, window: 1m, below: 1 }" ;;
      7 | 8) echo "    anomaly: { series: rate, sensitivity: 4 }" ;;
      *) echo "    threshold: { value: avg(latency_ms), window: 1m, above: 5000 }" ;;
    esac
  done
}

RESULTS=()
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
for n in $COUNTS; do
  rules_file "$n" >"$WORK/rules-$n.yaml"
  "$BIN/router" check --rules-file "$WORK/rules-$n.yaml" --log warn >/dev/null
  RADMIN="127.0.0.1:$(free_port)"
  "$BIN/router" --nats-url "nats://127.0.0.1:$NATS_PORT" --clickhouse-url "" --admin-listen "$RADMIN" \
    --rules-file "$WORK/rules-$n.yaml" --consumer "bench-$n" --state-bucket "bench_$n" --log warn \
    >"$WORK/router-$n.log" 2>&1 &
  ROUTER=$!
  PIDS+=("$ROUTER")
  wait_http "http://$RADMIN/readyz" 60
  events0="$(metric "http://$RADMIN" chute_router_events_total)"
  ticks0="$(cpu_ticks "$ROUTER")"
  "$BIN/loadtest" --grpc "http://$GRPC" --nats-url "nats://127.0.0.1:$NATS_PORT" --no-verify --no-progress \
    --mode open --rate "$RATE" --duration "${SECONDS_PER_RUN}s" --event-names 50 --attributes 2 \
    --tenants 4 --live off >"$WORK/load-$n.log" 2>&1 || die "loadtest failed: $(tail -n 5 "$WORK/load-$n.log")"
  # Let the router finish what was published.
  for _ in $(seq 1 100); do
    pending="$(metric "http://$RADMIN" chute_router_pending_messages)"
    [[ "${pending:-1}" == 0 ]] && break
    sleep 0.2
  done
  sleep 1
  events1="$(metric "http://$RADMIN" chute_router_events_total)"
  matches="$(metric_sum "http://$RADMIN" chute_router_matches_total)"
  ticks1="$(cpu_ticks "$ROUTER")"
  kill "$ROUTER"; wait "$ROUTER" 2>/dev/null || true
  hz="$(getconf CLK_TCK)"
  read -r us cores <<<"$(awk -v t0="$ticks0" -v t1="$ticks1" -v e0="$events0" -v e1="$events1" -v hz="$hz" -v s="$SECONDS_PER_RUN" \
    'BEGIN { cpu = (t1 - t0) / hz; ev = e1 - e0; printf "%.2f %.2f", (ev > 0 ? cpu / ev * 1e6 : 0), cpu / s }')"
  events="$(awk -v a="$events0" -v b="$events1" 'BEGIN { printf "%d", b - a }')"
  per_event="$(awk -v m="$matches" -v e="$events1" 'BEGIN { printf "%.1f", (e > 0 ? m / e : 0) }')"
  log "router with $n rules: $events events ($per_event matching rules each), $us µs CPU per event (about $cores cores at ${RATE}/s)"
  RESULTS+=("{\"rules\": $n, \"events\": $events, \"matches_per_event\": $per_event, \"cpu_us_per_event\": $us, \"cores\": $cores}")
done
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"

mkdir -p "$ROOT/bench/results"
OUT="$ROOT/bench/results/router-$(date -u +%Y-%m-%dT%H-%M-%SZ).json"
{
  printf '{"rate": %s, "seconds": %s, "load_start": "%s", "load_end": "%s", "runs": [' "$RATE" "$SECONDS_PER_RUN" "$LOAD_START" "$LOAD_END"
  (IFS=,; printf '%s' "${RESULTS[*]}")
  printf ']}\n'
} >"$OUT"
log "wrote $OUT (load average $LOAD_START -> $LOAD_END)"
