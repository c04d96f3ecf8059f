#!/usr/bin/env bash
# `make bench`: the whole pipeline on free loopback ports in a temp dir (release builds), then
#   1. the ceilings: bulk RowBinary insert straight into ClickHouse, raw JetStream publish
#   2. latency at fixed rates (open loop): ack, accepted -> queryable, accepted -> live stream;
#      the 50k/s run is profiled with perf (Chute's path and ClickHouse) and then repeated with
#      ClickHouse pinned to core 0 and everything else to core 1 (taskset)
#   3. the steady state: the highest open-loop rate with a flat JetStream backlog and accepted ->
#      queryable p99 < 1 s over 60 s probes (`loadtest steady`, bisection), and its ratio to the
#      insert ceiling; then the closed loop's maximum end-to-end rate (secondary)
#   4. peak RSS (VmHWM) of every process
#   5. CPU per event of every process over each fixed-rate window (/proc/<pid>/stat, passed to
#      the loadtest as --pid NAME=PID; the summary reports the 50k/s run)
# and writes bench/results/<date>.json (+ <date>-profile.txt) plus a printed summary. See
# BENCHMARKS.md.
#
# Knobs (environment): CHUTE_BENCH_MAX_SECONDS (closed loop, default 60),
# CHUTE_BENCH_RATE_SECONDS (each fixed rate, default 30), CHUTE_BENCH_RATES (default
# "10000 50000"), CHUTE_BENCH_CEILING_ROWS (default 1000000), CHUTE_BENCH_CONCURRENCY (closed
# loop workers, default 8), CHUTE_BENCH_STEADY_PROBES (default 5, 0 skips the search),
# CHUTE_BENCH_STEADY_SECONDS (each probe, default 60), CHUTE_BENCH_PINNED (0 skips the taskset
# run), CHUTE_BENCH_PROFILE (0 skips perf), CHUTE_BENCH_SERVICE_BIN (a directory with other
# builds of ingestor/aggregator/query-api to measure instead, for before/after comparisons; the
# load generator stays this tree's), CHUTE_BENCH_KEEP=1 keeps the temp dir (logs, raw JSON).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
BIN="$ROOT/target/release"
# Errors of the load generator without anyhow backtraces (panics keep theirs).
export RUST_LIB_BACKTRACE=0
MAX_SECONDS="${CHUTE_BENCH_MAX_SECONDS:-60}"
RATE_SECONDS="${CHUTE_BENCH_RATE_SECONDS:-30}"
RATES="${CHUTE_BENCH_RATES:-10000 50000}"
CEILING_ROWS="${CHUTE_BENCH_CEILING_ROWS:-1000000}"
CONCURRENCY="${CHUTE_BENCH_CONCURRENCY:-8}"
STEADY_PROBES="${CHUTE_BENCH_STEADY_PROBES:-5}"
STEADY_SECONDS="${CHUTE_BENCH_STEADY_SECONDS:-60}"
PINNED="${CHUTE_BENCH_PINNED:-1}"
PROFILE="${CHUTE_BENCH_PROFILE:-1}"
SERVICE_BIN="${CHUTE_BENCH_SERVICE_BIN:-$BIN}"
STAMP="$(date -u +%Y-%m-%dT%H-%M-%SZ)"

log() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33m!!\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31mxx\033[0m %s\n' "$*" >&2; exit 1; }

command -v nats-server >/dev/null || die "nats-server missing: run 'make deps'"
[[ -x "$PY" ]] || die "$PY missing: run 'make deps'"

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p chute-ingestor -p chute-aggregator -p chute-loadtest)
QUERY_API=0
if (cd "$ROOT" && cargo build --release -q -p chute-query-api 2>/dev/null) && [[ -x "$SERVICE_BIN/query-api" ]]; then
  QUERY_API=1
else
  warn "query-api does not build: live latency is measured on the NATS subjects instead of the SSE stream"
fi

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
WORK="$(mktemp -d /tmp/chute-bench.XXXXXX)"
mkdir -p "$WORK/logs"
declare -A PID=()

cleanup() {
  local name
  for name in "${!PID[@]}"; do
    kill "${PID[$name]}" 2>/dev/null || true
  done
  for name in "${!PID[@]}"; do
    wait "${PID[$name]}" 2>/dev/null || true
  done
  if [[ "${CHUTE_BENCH_KEEP:-0}" == 1 ]]; then
    log "kept $WORK (logs/, run-*.json, ceiling.json)"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME CMD...: background process, log in $WORK/logs/NAME.log.
start() {
  local name="$1"; shift
  "$@" >"$WORK/logs/$name.log" 2>&1 &
  PID[$name]=$!
}

# wait_http URL SECONDS NAME
wait_http() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    kill -0 "${PID[$3]}" 2>/dev/null || die "$3 exited; log: $(tail -n 20 "$WORK/logs/$3.log")"
    sleep 0.1
  done
  die "$3 did not answer $1 within $2 s; log: $(tail -n 20 "$WORK/logs/$3.log")"
}

log "starting the pipeline in $WORK"
NATS_PORT="$(free_port)"
NATS_URL="nats://127.0.0.1:$NATS_PORT"
# JetStream reserves each stream's max_bytes (EVENTS: 16 GiB) against its file-store limit,
# which defaults to 75 % of the free disk; the ceiling's scratch stream reserves as much again
# ("insufficient storage resources" with less than ~46 GB free). Both hold a few GiB at most
# during the bench, so the limit is set above the reservations.
printf 'jetstream {\n  store_dir: "%s"\n  max_file_store: 64GB\n}\n' "$WORK/jetstream" >"$WORK/nats.conf"
start nats-server nats-server -a 127.0.0.1 -p "$NATS_PORT" -c "$WORK/nats.conf"

start clickhouse "$PY" "$ROOT/clickhouse-dev/chserver.py" --host 127.0.0.1 --port 0 \
  --data-dir "$WORK/clickhouse" --ready-file "$WORK/clickhouse.port" --log-level warning
for ((i = 0; i < 600; i++)); do
  [[ -s "$WORK/clickhouse.port" ]] && break
  kill -0 "${PID[clickhouse]}" 2>/dev/null || die "ClickHouse dev server exited: $(tail -n 20 "$WORK/logs/clickhouse.log")"
  sleep 0.1
done
CH_URL="http://127.0.0.1:$(cat "$WORK/clickhouse.port")"
wait_http "$CH_URL/ping" 60 clickhouse

"$SERVICE_BIN/aggregator" migrate --clickhouse-url "$CH_URL" --clickhouse-database chute >"$WORK/logs/migrate.log" 2>&1 ||
  die "migrations failed: $(tail -n 20 "$WORK/logs/migrate.log")"

GRPC="127.0.0.1:$(free_port)"
INGEST_ADMIN="127.0.0.1:$(free_port)"
start ingestor "$SERVICE_BIN/ingestor" --grpc-listen "$GRPC" --admin-listen "$INGEST_ADMIN" --nats-url "$NATS_URL" --log warn
wait_http "http://$INGEST_ADMIN/readyz" 30 ingestor

AGG_ADMIN="127.0.0.1:$(free_port)"
start aggregator "$SERVICE_BIN/aggregator" --nats-url "$NATS_URL" --clickhouse-url "$CH_URL" --clickhouse-database chute \
  --admin-listen "$AGG_ADMIN" --log warn
wait_http "http://$AGG_ADMIN/readyz" 60 aggregator

QUERY_FLAGS=(--live nats)
if [[ "$QUERY_API" == 1 ]]; then
  QUERY="127.0.0.1:$(free_port)"
  start query-api "$SERVICE_BIN/query-api" --listen "$QUERY" --clickhouse-url "$CH_URL" --clickhouse-database chute \
    --nats-url "$NATS_URL" --log warn
  wait_http "http://$QUERY/readyz" 30 query-api
  QUERY_FLAGS=(--query-url "http://$QUERY" --live sse)
fi

# check_alive STEP: records services that died (they are part of the result, not a footnote).
EXITED=()
check_alive() {
  local name
  for name in "${!PID[@]}"; do
    if ! kill -0 "${PID[$name]}" 2>/dev/null && [[ " ${EXITED[*]} " != *" $name@"* ]]; then
      EXITED+=("$name@$1")
      warn "$name exited during $1; last log lines:"
      grep -v '^ ' "$WORK/logs/$name.log" | tail -n 5 >&2 || true
    fi
  done
}

# CPU per event (fixed-rate runs): every service's pid; the loadtest measures itself.
PID_FLAGS=()
for name in "${!PID[@]}"; do
  PID_FLAGS+=(--pid "$name=${PID[$name]}")
done

COMMON=(--endpoints-file /dev/null --grpc "$GRPC" --nats-url "$NATS_URL" --clickhouse-url "$CH_URL"
  --clickhouse-database chute --no-progress)
BACKLOG=(--backlog-metrics-url "http://$AGG_ADMIN/metrics")

# profile SECONDS: perf samples of Chute's path and ClickHouse during a run, one recording per
# process, in the background; profile_report writes each one's hottest symbols next to the result.
PROFILE_PIDS=()
PROFILED=(ingestor nats-server aggregator clickhouse)
profile() {
  [[ "$PROFILE" == 1 ]] && command -v perf >/dev/null || return 0
  local name
  for name in "${PROFILED[@]}"; do
    (sleep 2 && exec perf record -q -F 499 -g -p "${PID[$name]}" -o "$WORK/perf-$name.data" -- sleep "$1") \
      >"$WORK/logs/perf-$name.log" 2>&1 &
    PROFILE_PIDS+=($!)
  done
}
profile_report() {
  [[ ${#PROFILE_PIDS[@]} -gt 0 ]] || return 0
  local pid name
  for pid in "${PROFILE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  mkdir -p "$ROOT/bench/results"
  local out="$ROOT/bench/results/$STAMP-profile.txt"
  {
    echo "# perf record -F 499 -g of each process over the 50k/s run ($(cut -d' ' -f1-3 /proc/loadavg) load average at its end)"
    echo "# per process: samples, then the hottest symbols (self time, no children; >= 0.7 %)"
    for name in "${PROFILED[@]}"; do
      echo
      echo "## $name (pid ${PID[$name]}, $(cat "/proc/${PID[$name]}/comm" 2>/dev/null || echo exited))"
      if [[ -s "$WORK/perf-$name.data" ]]; then
        perf report -i "$WORK/perf-$name.data" --stdio --no-children --sort dso,sym -g none \
          --percent-limit 0.7 2>/dev/null | grep -E '^# Samples|^ +[0-9]' | head -n 40 || true
      else
        echo "no samples: $(tail -n 2 "$WORK/logs/perf-$name.log" 2>/dev/null)"
      fi
    done
  } >"$out" 2>&1 || true
  log "profile written to $out"
}


log "1. ceilings: $CEILING_ROWS rows into ClickHouse, the same batches into JetStream"
"$BIN/loadtest" ceiling "${COMMON[@]:0:8}" --rows "$CEILING_ROWS" --out "$WORK/ceiling.json" >/dev/null
check_alive ceiling

n=0
for rate in $RATES; do
  n=$((n + 1))
  log "2.$n. open loop at $rate events/s for ${RATE_SECONDS}s"
  [[ "$rate" == 50000 ]] && profile "$((RATE_SECONDS - 4))"
  "$BIN/loadtest" run "${COMMON[@]}" "${QUERY_FLAGS[@]}" "${PID_FLAGS[@]}" "${BACKLOG[@]}" --mode open --rate "$rate" \
    --duration "${RATE_SECONDS}s" --drain-timeout 120s --label "open-$rate" \
    --out "$WORK/run-1-open-$(printf '%07d' "$rate").json" || warn "run at $rate/s did not pass"
  [[ "$rate" == 50000 ]] && profile_report
  check_alive "open-$rate"
done

# set_cores CLICKHOUSE_CPUS PIPELINE_CPUS: every thread of every service (taskset -a).
set_cores() {
  local name
  for name in "${!PID[@]}"; do
    if [[ "$name" == clickhouse ]]; then
      taskset -a -p -c "$1" "${PID[$name]}" >/dev/null || warn "taskset $name failed"
    else
      taskset -a -p -c "$2" "${PID[$name]}" >/dev/null || warn "taskset $name failed"
    fi
  done
}
if [[ "$PINNED" == 1 && "$(nproc)" -ge 2 ]] && command -v taskset >/dev/null; then
  log "2.$((n + 1)). open loop at 50000 events/s for ${RATE_SECONDS}s, ClickHouse on core 0, the pipeline and the load generator on core 1"
  set_cores 0 1
  taskset -c 1 "$BIN/loadtest" run "${COMMON[@]}" "${QUERY_FLAGS[@]}" "${PID_FLAGS[@]}" "${BACKLOG[@]}" --mode open --rate 50000 \
    --duration "${RATE_SECONDS}s" --drain-timeout 120s --label "open-50000-pinned" \
    --out "$WORK/run-1-open-0050000-pinned.json" || warn "pinned run at 50000/s did not pass"
  set_cores "0-$(($(nproc) - 1))" "0-$(($(nproc) - 1))"
  check_alive open-50000-pinned
fi

if [[ "$STEADY_PROBES" -gt 0 ]]; then
  log "3. steady state: $STEADY_PROBES probes of ${STEADY_SECONDS}s between 10k/s and the insert ceiling"
  "$BIN/loadtest" steady "${COMMON[@]}" --live off "${BACKLOG[@]}" --ceiling-file "$WORK/ceiling.json" \
    --probes "$STEADY_PROBES" --probe-duration "${STEADY_SECONDS}s" --drain-timeout 300s \
    --probe-dir "$WORK/steady" --steady-out "$WORK/steady.json" || warn "steady-state search failed"
  check_alive steady
fi

log "3b. closed loop for ${MAX_SECONDS}s ($CONCURRENCY workers, PublishStream, 1000 events/request)"
"$BIN/loadtest" run "${COMMON[@]}" --drain-timeout 300s --live off --mode closed --duration "${MAX_SECONDS}s" \
  --transport stream --concurrency "$CONCURRENCY" --stream-window 4 --events-per-request 1000 --connections 4 \
  --label closed-max --out "$WORK/run-2-closed-max.json" || warn "closed-loop run did not pass"
check_alive closed-max

log "4. peak RSS"
{
  printf '{'
  sep=""
  for name in "${!PID[@]}"; do
    kib="$(awk '/^VmHWM:/ {print $2}' "/proc/${PID[$name]}/status" 2>/dev/null || true)"
    [[ -n "$kib" ]] && printf '%s"%s": %s' "$sep" "$name" "$kib" && sep=", "
  done
  printf '}\n'
} >"$WORK/rss.json"

# The machine, and how busy it was: other work on the 2 cores skews every number.
printf '{"cores": %s, "memory_kib": %s, "kernel": "%s", "cpu": "%s", "git": "%s", "query_api": %s, "loadavg": "%s / %s", "exited": "%s"}\n' \
  "$(nproc)" "$(awk '/MemTotal/ {print $2}' /proc/meminfo)" "$(uname -r)" \
  "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" \
  "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "$([[ "$QUERY_API" == 1 ]] && echo true || echo false)" \
  "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)" "${EXITED[*]:-}" >"$WORK/machine.json"

mkdir -p "$ROOT/bench/results"
OUT="$ROOT/bench/results/$STAMP.json"
"$BIN/loadtest" summary --dir "$WORK" --out "$OUT"
