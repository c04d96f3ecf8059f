#!/usr/bin/env bash
# `make up`: the whole local pipeline on loopback, state under .local/, then a demo.
source "$(dirname "$0")/lib.sh"
# TLS, API keys, NATS and ClickHouse users: scripts/up-secure.sh (README "Local secure mode").
[[ "${CHUTE_SECURE:-0}" == 1 ]] && exec "$ROOT/scripts/up-secure.sh"
"$ROOT/scripts/install-deps.sh"
mkdir -p "$LOCAL/logs"
for pidfile in "$LOCAL"/*-[0-9].pid; do
  [[ -f "$pidfile" ]] && is_running "$(basename "$pidfile" .pid)" &&
    die "the cluster from 'make up-cluster' is running: run 'make down' first"
done
claim_mode open

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p chute-ingestor -p chute-aggregator -p chute-query-api -p chute-router -p chute-loadtest)
BIN="$ROOT/target/release"

# Keep the ports of a previous `make up` so endpoints stay stable.
NATS_PORT="$(env_get CHUTE_NATS_URL | sed -n 's#.*:\([0-9]*\)$#\1#p')"
CH_URL="$(env_get CHUTE_CLICKHOUSE_HTTP)"
GRPC="$(env_get CHUTE_INGEST_GRPC)"
ADMIN="$(env_get CHUTE_INGEST_ADMIN)"; ADMIN="${ADMIN#http://}"
AGG_ADMIN="$(env_get CHUTE_AGGREGATOR_ADMIN)"; AGG_ADMIN="${AGG_ADMIN#http://}"
QUERY="$(env_get CHUTE_QUERY_HTTP)"; QUERY="${QUERY#http://}"
ROUTER_ADMIN="$(env_get CHUTE_ROUTER_ADMIN)"; ROUTER_ADMIN="${ROUTER_ADMIN#http://}"
OTLP_GRPC="$(env_get CHUTE_OTLP_GRPC)"; OTLP_GRPC="${OTLP_GRPC#http://}"
OTLP_HTTP="$(env_get CHUTE_OTLP_HTTP)"; OTLP_HTTP="${OTLP_HTTP#http://}"

if is_running nats; then
  log "nats-server already running (pid $(cat "$LOCAL/nats.pid"), port $NATS_PORT)"
else
  NATS_PORT="$(pick_port "${NATS_PORT:-4222}")"
  start nats nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$LOCAL/jetstream"
  wait_port "$NATS_PORT" 20 nats
  log "nats-server started on 127.0.0.1:$NATS_PORT (JetStream in .local/jetstream)"
fi

if is_running clickhouse; then
  log "ClickHouse dev server already running (pid $(cat "$LOCAL/clickhouse.pid"), $CH_URL)"
else
  CH_PORT="$(pick_port "$(sed -n 's#.*:\([0-9]*\)$#\1#p' <<<"${CH_URL:-http://127.0.0.1:8123}")")"
  CH_URL="http://127.0.0.1:$CH_PORT"
  start clickhouse "$PY" "$ROOT/clickhouse-dev/chserver.py" --host 127.0.0.1 --port "$CH_PORT" --data-dir "$LOCAL/clickhouse"
  wait_http "$CH_URL/ping" 120 clickhouse
  log "ClickHouse dev server (chdb, ClickHouse 26.9 engine) started on $CH_URL (data in .local/clickhouse)"
fi

log "applying ClickHouse migrations (aggregator migrate)"
"$BIN/aggregator" migrate --clickhouse-url "$CH_URL" --log warn

if [[ -n "${CHUTE_API_KEYS_FILE:-}" ]]; then
  log "API keys enforced from $CHUTE_API_KEYS_FILE"
else
  warn "*** NO API KEYS: ingest is open to any caller and tenant (set CHUTE_API_KEYS_FILE to enforce keys) ***"
fi

if is_running ingestor; then
  log "ingestor already running (pid $(cat "$LOCAL/ingestor.pid"), gRPC $GRPC)"
else
  GRPC_PORT="${GRPC##*:}" ADMIN_PORT="${ADMIN##*:}"
  GRPC="127.0.0.1:$(pick_port "${GRPC_PORT:-7400}")"
  ADMIN="127.0.0.1:$(pick_port "${ADMIN_PORT:-7401}")"
  OTLP_GRPC_PORT="${OTLP_GRPC##*:}" OTLP_HTTP_PORT="${OTLP_HTTP##*:}"
  OTLP_GRPC="127.0.0.1:$(pick_port "${OTLP_GRPC_PORT:-4317}")"
  OTLP_HTTP="127.0.0.1:$(pick_port "${OTLP_HTTP_PORT:-4318}")"
  # A local stream of 2 GiB: JetStream reserves the whole size up front, and the production
  # default (16 GiB) does not fit a laptop or CI disk with less than ~22 GB free.
  CHUTE_NATS_URL="nats://127.0.0.1:$NATS_PORT" start ingestor "$BIN/ingestor" --grpc-listen "$GRPC" --admin-listen "$ADMIN" \
    --otlp-grpc-listen "$OTLP_GRPC" --otlp-http-listen "$OTLP_HTTP" --stream-max-bytes "${CHUTE_STREAM_MAX_BYTES:-2GiB}"
  wait_http "http://$ADMIN/readyz" 30 ingestor
  log "ingestor started: gRPC $GRPC, admin http://$ADMIN"
fi

if is_running aggregator; then
  log "aggregator already running (pid $(cat "$LOCAL/aggregator.pid"), admin http://$AGG_ADMIN)"
else
  AGG_PORT="${AGG_ADMIN##*:}"
  AGG_ADMIN="127.0.0.1:$(pick_port "${AGG_PORT:-7410}")"
  start aggregator "$BIN/aggregator" --nats-url "nats://127.0.0.1:$NATS_PORT" --clickhouse-url "$CH_URL" --admin-listen "$AGG_ADMIN"
  wait_http "http://$AGG_ADMIN/readyz" 30 aggregator
  log "aggregator started: admin http://$AGG_ADMIN"
fi

if is_running query-api; then
  log "query API already running (pid $(cat "$LOCAL/query-api.pid"), http://$QUERY)"
else
  QUERY_PORT="${QUERY##*:}"
  QUERY="127.0.0.1:$(pick_port "${QUERY_PORT:-7420}")"
  start query-api "$BIN/query-api" --listen "$QUERY" --nats-url "nats://127.0.0.1:$NATS_PORT" --clickhouse-url "$CH_URL"
  wait_http "http://$QUERY/readyz" 30 query-api
  log "query API started: http://$QUERY"
fi

# The router: live rules from scripts/rules.local.yaml (or CHUTE_ROUTER_RULES_FILE), reloaded on change.
RULES_FILE="${CHUTE_ROUTER_RULES_FILE:-$ROOT/scripts/rules.local.yaml}"
if is_running router; then
  log "router already running (pid $(cat "$LOCAL/router.pid"), admin http://$ROUTER_ADMIN)"
else
  ROUTER_PORT="${ROUTER_ADMIN##*:}"
  ROUTER_ADMIN="127.0.0.1:$(pick_port "${ROUTER_PORT:-7430}")"
  "$BIN/router" check --rules-file "$RULES_FILE" --log warn >/dev/null || die "rules file $RULES_FILE does not validate"
  start router "$BIN/router" --nats-url "nats://127.0.0.1:$NATS_PORT" --clickhouse-url "$CH_URL" \
    --admin-listen "$ROUTER_ADMIN" --rules-file "$RULES_FILE"
  wait_http "http://$ROUTER_ADMIN/readyz" 60 router
  log "router started: admin http://$ROUTER_ADMIN, rules $RULES_FILE"
fi

cat >"$LOCAL/endpoints.env" <<ENV
CHUTE_NATS_URL=nats://127.0.0.1:$NATS_PORT
CHUTE_CLICKHOUSE_HTTP=$CH_URL
CHUTE_INGEST_GRPC=$GRPC
CHUTE_INGEST_ADMIN=http://$ADMIN
CHUTE_OTLP_GRPC=http://$OTLP_GRPC
CHUTE_OTLP_HTTP=http://$OTLP_HTTP
CHUTE_AGGREGATOR_ADMIN=http://$AGG_ADMIN
CHUTE_QUERY_HTTP=http://$QUERY
CHUTE_ROUTER_ADMIN=http://$ROUTER_ADMIN
ENV

log "sending sample events through the ingestor"
first_key="$( [[ -n "${CHUTE_API_KEYS_FILE:-}" ]] && awk '!/^#/ && NF==2 {print $2; exit}' "$CHUTE_API_KEYS_FILE" || true)"
"$PY" "$ROOT/scripts/send_sample.py" "$GRPC" $first_key
stored="$(curl -fsS "http://$ADMIN/metrics" | awk '/^chute_ingest_events_accepted_total/ {print $2}')"
log "ingestor has accepted ${stored:-0} events since it started (durable in JetStream stream EVENTS)"
log "reading them back from ClickHouse (raw events and the minute rollup)"
query() { curl -fsS "$CH_URL/?database=chute" --data-binary "$1"; }
for _ in $(seq 1 50); do
  [[ "$(query "SELECT count() FROM events WHERE tenant = 'demo' AND inserted_at > now() - INTERVAL 1 MINUTE")" -ge 5 ]] && break
  sleep 0.2
done
query "SELECT name, count() AS events, round(avg(metrics['latency_ms']), 1) AS avg_latency_ms, max(inserted_at) AS last_inserted FROM events FINAL WHERE tenant = 'demo' GROUP BY name FORMAT PrettyCompactMonoBlock"
query "SELECT minute, name, events, users, sessions FROM events_1m_v WHERE tenant = 'demo' ORDER BY minute DESC LIMIT 3 FORMAT PrettyCompactMonoBlock"
routed="$(curl -fsS "http://$ROUTER_ADMIN/metrics" | awk '/^chute_router_routed_total/ {s += $2} END {print s + 0}')"
log "router: $routed sample events routed to ROUTES (rule slow_requests: latency_ms > 60, stream subject routes.demo.slow_requests)"
log "and through the query API: GET /v1/timeseries?tenant=demo&agg=p99&metric=latency_ms&step=1m&from=<10 minutes ago>"
from_ms=$(( ($(date +%s) - 600) * 1000 ))
curl -fsS "http://$QUERY/v1/timeseries?tenant=demo&agg=p99&metric=latency_ms&step=1m&from=$from_ms" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); pts=[p for p in d["points"] if p["value"] is not None]; print("  source:", d["source"], " non-empty points:", pts[-3:])'

cat <<MSG

Chute is up. Endpoints (also in .local/endpoints.env, pids in .local/*.pid, logs in .local/logs/):
  NATS (JetStream)         nats://127.0.0.1:$NATS_PORT
  ClickHouse (dev server)  $CH_URL            e.g. curl '$CH_URL/?query=SELECT+version()'
  Ingestor gRPC            $GRPC              chute.v1.IngestService, grpc.health.v1, reflection
  Ingestor admin           http://$ADMIN      /metrics /healthz /readyz
  OTLP gRPC / HTTP         http://$OTLP_GRPC / http://$OTLP_HTTP   any OTel SDK or Collector (README "OTLP")
  Aggregator admin         http://$AGG_ADMIN      /metrics /healthz /readyz
  Query API                http://$QUERY      /v1/timeseries /v1/top /v1/sessions /v1/events /v1/stream /openapi.json
  Router admin             http://$ROUTER_ADMIN      /metrics /healthz /readyz   rules: $RULES_FILE (edit it live)
Send more events:   .venv/bin/python scripts/send_sample.py $GRPC
Live page:          http://$QUERY/?tenant=demo
Watch them live:    curl -N 'http://$QUERY/v1/stream?tenant=demo'
Stop everything:    make down
To run secured (TLS on every hop, API keys, NATS and ClickHouse users): make down && CHUTE_SECURE=1 make up
MSG
