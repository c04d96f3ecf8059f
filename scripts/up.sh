#!/usr/bin/env bash
# `make up`: the whole local pipeline on loopback, state under .local/, then a demo.
source "$(dirname "$0")/lib.sh"
"$ROOT/scripts/install-deps.sh"
mkdir -p "$LOCAL/logs"

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p chute-ingestor)
BIN="$ROOT/target/release"

# Keep the ports of a previous `make up` so endpoints stay stable.
NATS_PORT="$(env_get CHUTE_NATS_URL | sed -n 's#.*:\([0-9]*\)$#\1#p')"
CH_URL="$(env_get CHUTE_CLICKHOUSE_HTTP)"
GRPC="$(env_get CHUTE_INGEST_GRPC)"
ADMIN="$(env_get CHUTE_INGEST_ADMIN)"; ADMIN="${ADMIN#http://}"

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
  CHUTE_NATS_URL="nats://127.0.0.1:$NATS_PORT" start ingestor "$BIN/ingestor" --grpc-listen "$GRPC" --admin-listen "$ADMIN"
  wait_http "http://$ADMIN/readyz" 30 ingestor
  log "ingestor started: gRPC $GRPC, admin http://$ADMIN"
fi

cat >"$LOCAL/endpoints.env" <<ENV
CHUTE_NATS_URL=nats://127.0.0.1:$NATS_PORT
CHUTE_CLICKHOUSE_HTTP=$CH_URL
CHUTE_INGEST_GRPC=$GRPC
CHUTE_INGEST_ADMIN=http://$ADMIN
ENV

log "sending sample events through the ingestor"
first_key="$( [[ -n "${CHUTE_API_KEYS_FILE:-}" ]] && awk '!/^#/ && NF==2 {print $2; exit}' "$CHUTE_API_KEYS_FILE" || true)"
"$PY" "$ROOT/scripts/send_sample.py" "$GRPC" $first_key
stored="$(curl -fsS "http://$ADMIN/metrics" | awk '/^chute_ingest_events_accepted_total/ {print $2}')"
log "ingestor has accepted ${stored:-0} events since it started (durable in JetStream stream EVENTS)"

cat <<MSG

Chute is up. Endpoints (also in .local/endpoints.env, pids in .local/*.pid, logs in .local/logs/):
  NATS (JetStream)         nats://127.0.0.1:$NATS_PORT
  ClickHouse (dev server)  $CH_URL            e.g. curl '$CH_URL/?query=SELECT+version()'
  Ingestor gRPC            $GRPC              chute.v1.IngestService, grpc.health.v1, reflection
  Ingestor admin           http://$ADMIN      /metrics /healthz /readyz
Send more events:   .venv/bin/python scripts/send_sample.py $GRPC
Stop everything:    make down
MSG
