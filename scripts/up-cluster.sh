#!/usr/bin/env bash
# `make up-cluster`: the production shape on loopback. A 3-node NATS JetStream cluster (EVENTS,
# EVENTS_DLQ and the aggregator's ledger buckets at R3), 2 ingestors, 3 aggregators, 2 query APIs and the
# ClickHouse dev server; state under .local/, every URL in .local/endpoints.env. `make down`
# stops it.
source "$(dirname "$0")/lib.sh"
"$ROOT/scripts/install-deps.sh"
mkdir -p "$LOCAL/logs" "$LOCAL/cluster"

for pidfile in "$LOCAL"/*.pid; do
  [[ -f "$pidfile" ]] || continue
  name="$(basename "$pidfile" .pid)"
  is_running "$name" && die "$name is already running (from make up or up-cluster): run 'make down' first"
  rm -f "$pidfile"
done

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p chute-ingestor -p chute-aggregator -p chute-query-api -p chute-loadtest)
BIN="$ROOT/target/release"

# NATS: three nodes, each with its own server name, store and route port.
declare -a NATS_PORTS ROUTE_PORTS
for i in 1 2 3; do
  NATS_PORTS[$i]="$(pick_port $((4221 + i)))"
  ROUTE_PORTS[$i]="$(pick_port $((6221 + i)))"
done
ROUTES="$(for i in 1 2 3; do printf 'nats-route://127.0.0.1:%s,' "${ROUTE_PORTS[$i]}"; done)"
ROUTES="${ROUTES%,}"
for i in 1 2 3; do
  cat >"$LOCAL/cluster/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:${NATS_PORTS[$i]}
jetstream {
  store_dir: "$LOCAL/cluster/n$i"
  # Explicit: without it JetStream allows 75% of the free disk, and R3 streams reserve their
  # whole size on every node.
  max_file_store: 64GB
}
cluster {
  name: chute
  listen: 127.0.0.1:${ROUTE_PORTS[$i]}
  routes: [${ROUTES//,/, }]
}
CONF
  start "nats-$i" nats-server -c "$LOCAL/cluster/n$i.conf"
done
for i in 1 2 3; do wait_port "${NATS_PORTS[$i]}" 20 "nats-$i"; done
NATS_URLS="$(for i in 1 2 3; do printf 'nats://127.0.0.1:%s,' "${NATS_PORTS[$i]}"; done)"
NATS_URLS="${NATS_URLS%,}"
for _ in $(seq 1 100); do
  grep -qh "metadata leader" "$LOCAL"/logs/nats-[123].log 2>/dev/null && break
  sleep 0.1
done
log "NATS cluster started: $NATS_URLS"

CH_PORT="$(pick_port 8123)"
CH_URL="http://127.0.0.1:$CH_PORT"
start clickhouse "$PY" "$ROOT/clickhouse-dev/chserver.py" --host 127.0.0.1 --port "$CH_PORT" --data-dir "$LOCAL/clickhouse"
wait_http "$CH_URL/ping" 120 clickhouse
log "ClickHouse dev server started on $CH_URL"
"$BIN/aggregator" migrate --clickhouse-url "$CH_URL" --log warn

declare -a GRPCS ADMINS OTLP_GRPCS OTLP_HTTPS AGG_ADMINS QUERIES
for i in 1 2; do
  GRPCS[$i]="127.0.0.1:$(pick_port $((7398 + 2 * i)))"
  ADMINS[$i]="127.0.0.1:$(pick_port $((7399 + 2 * i)))"
  OTLP_GRPCS[$i]="127.0.0.1:$(pick_port $((4315 + 2 * i)))"
  OTLP_HTTPS[$i]="127.0.0.1:$(pick_port $((4316 + 2 * i)))"
  start "ingestor-$i" "$BIN/ingestor" --nats-url "$NATS_URLS" --grpc-listen "${GRPCS[$i]}" \
    --admin-listen "${ADMINS[$i]}" --otlp-grpc-listen "${OTLP_GRPCS[$i]}" --otlp-http-listen "${OTLP_HTTPS[$i]}" \
    --stream-replicas 3 --stream-max-bytes "${CHUTE_STREAM_MAX_BYTES:-2GiB}"
  wait_http "http://${ADMINS[$i]}/readyz" 90 "ingestor-$i"
done
log "ingestors started: ${GRPCS[1]}, ${GRPCS[2]} (OTLP gRPC ${OTLP_GRPCS[*]}, OTLP HTTP ${OTLP_HTTPS[*]})"
for i in 1 2 3; do
  AGG_ADMINS[$i]="127.0.0.1:$(pick_port $((7409 + i)))"
  start "aggregator-$i" "$BIN/aggregator" --nats-url "$NATS_URLS" --clickhouse-url "$CH_URL" \
    --admin-listen "${AGG_ADMINS[$i]}" --replicas 3 --instance-id "aggregator-$i"
done
for i in 1 2 3; do wait_http "http://${AGG_ADMINS[$i]}/readyz" 90 "aggregator-$i"; done
log "aggregators started: admin ${AGG_ADMINS[*]}"
for i in 1 2; do
  QUERIES[$i]="127.0.0.1:$(pick_port $((7419 + i)))"
  start "query-api-$i" "$BIN/query-api" --listen "${QUERIES[$i]}" --nats-url "$NATS_URLS" --clickhouse-url "$CH_URL"
  wait_http "http://${QUERIES[$i]}/readyz" 30 "query-api-$i"
done
log "query APIs started: ${QUERIES[1]}, ${QUERIES[2]}"

cat >"$LOCAL/endpoints.env" <<ENV
CHUTE_NATS_URL=$NATS_URLS
CHUTE_CLICKHOUSE_HTTP=$CH_URL
CHUTE_INGEST_GRPC=${GRPCS[1]},${GRPCS[2]}
CHUTE_INGEST_ADMIN=http://${ADMINS[1]},http://${ADMINS[2]}
CHUTE_OTLP_GRPC=http://${OTLP_GRPCS[1]},http://${OTLP_GRPCS[2]}
CHUTE_OTLP_HTTP=http://${OTLP_HTTPS[1]},http://${OTLP_HTTPS[2]}
CHUTE_AGGREGATOR_ADMIN=http://${AGG_ADMINS[1]},http://${AGG_ADMINS[2]},http://${AGG_ADMINS[3]}
CHUTE_QUERY_HTTP=http://${QUERIES[1]},http://${QUERIES[2]}
ENV

log "sending sample events through both ingestors"
for i in 1 2; do "$PY" "$ROOT/scripts/send_sample.py" "${GRPCS[$i]}"; done
for _ in $(seq 1 100); do
  [[ "$(curl -fsS "$CH_URL/?database=chute" --data-binary "SELECT count() FROM events WHERE tenant = 'demo' AND inserted_at > now() - INTERVAL 1 MINUTE")" -ge 10 ]] && break
  sleep 0.2
done
curl -fsS "$CH_URL/?database=chute" --data-binary "SELECT count() AS demo_events_last_minute FROM events FINAL WHERE tenant = 'demo' AND inserted_at > now() - INTERVAL 1 MINUTE FORMAT PrettyCompactMonoBlock"
owned_by() { curl -fsS "http://${AGG_ADMINS[$1]}/metrics" | awk '/^chute_aggregator_owned_partitions / {print $2}'; }
# The partitions spread within one of even (6/5/5) a few ownership rounds after the last start.
for _ in $(seq 1 60); do
  counts="$(for i in 1 2 3; do owned_by "$i"; done | sort -n | tr '\n' ' ')"
  [[ "$counts" == "5 5 6 " ]] && break
  sleep 0.5
done
for i in 1 2 3; do log "aggregator-$i owns $(owned_by "$i") of 16 partitions"; done

cat <<MSG

Chute (cluster) is up. Endpoints in .local/endpoints.env; pids in .local/*.pid; logs in .local/logs/.
  NATS cluster (R3)   $NATS_URLS  (EVENTS, EVENTS_DLQ and the ledger buckets at R3)
  ClickHouse          $CH_URL
  Ingestors (gRPC)    ${GRPCS[1]}  ${GRPCS[2]}
  OTLP gRPC / HTTP    ${OTLP_GRPCS[*]} / ${OTLP_HTTPS[*]}
  Aggregators admin   ${AGG_ADMINS[*]}
  Query APIs          http://${QUERIES[1]}  http://${QUERIES[2]}
Load both ingestors: target/release/loadtest --ingest ${GRPCS[1]},${GRPCS[2]} --clickhouse-url $CH_URL
Stop everything:     make down
MSG
