#!/usr/bin/env bash
# `CHUTE_SECURE=1 make up`: the local pipeline of `make up` with every protection on: TLS on the
# ingestor (gRPC, OTLP), the query API, NATS and ClickHouse, all issued by a self-signed CA made
# here; API keys on ingest and query; each service its own NATS user (deploy/nats/chute-nats.conf)
# and its own ClickHouse user (created by `aggregator migrate`; the router reads with the query
# API's read-only one). The router runs deploy/rules.example.yaml (or CHUTE_ROUTER_RULES_FILE) with
# a generated webhook secret. Secrets are generated once under
# .local/secure/ (mode 0600) and reused; `make down` stops it.
#
# CHUTE_LOCAL_DIR moves the state (default .local), CHUTE_BIN_DIR takes the binaries from there
# instead of building release ones, CHUTE_EPHEMERAL_PORTS=1 picks free ports (tests).
source "$(dirname "$0")/lib.sh"
"$ROOT/scripts/install-deps.sh"
command -v openssl >/dev/null || die "openssl is needed to make the local CA (apt-get install openssl)"
claim_mode secure
SECURE="$LOCAL/secure"
SECRETS="$SECURE/secrets"
mkdir -p "$LOCAL/logs" "$SECRETS"
chmod 700 "$SECURE" "$SECRETS"

if [[ -n "${CHUTE_BIN_DIR:-}" ]]; then
  BIN="$CHUTE_BIN_DIR"
  for binary in ingestor aggregator query-api router; do
    [[ -x "$BIN/$binary" ]] || die "CHUTE_BIN_DIR=$BIN has no $binary (cargo build -p chute-$binary)"
  done
else
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -q -p chute-ingestor -p chute-aggregator -p chute-query-api -p chute-router -p chute-loadtest)
  BIN="$ROOT/target/release"
fi

# --- Secrets, once: a CA, one server certificate for 127.0.0.1/localhost, passwords, API key.
CA="$SECURE/ca.pem" CERT="$SECURE/server.pem" KEY="$SECRETS/server.key"
KEYS_FILE="$SECRETS/api-keys.txt" DEMO_KEY="$SECRETS/demo.key"
(
  umask 077
  if [[ ! -f "$CA" || ! -f "$SECRETS/ca.key" ]]; then
    log "making a local CA ($CA) and a server certificate for 127.0.0.1 and localhost"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
      -keyout "$SECRETS/ca.key" -out "$CA" -subj "/CN=Chute local CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    rm -f "$CERT" "$KEY"
  fi
  if [[ ! -f "$CERT" || ! -f "$KEY" ]]; then
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$KEY" -out "$SECURE/server.csr" -subj "/CN=localhost" 2>/dev/null
    openssl x509 -req -in "$SECURE/server.csr" -CA "$CA" -CAkey "$SECRETS/ca.key" -days 825 \
      -set_serial "0x$(openssl rand -hex 16)" -out "$CERT" -extfile <(printf '%s\n' \
        "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth") 2>/dev/null
    rm -f "$SECURE/server.csr"
    chmod 644 "$CA" "$CERT"  # certificates are public; their keys stay 0600
  fi
  for name in nats-ingestor nats-aggregator nats-query-api nats-router nats-operator webhook-ops \
    clickhouse-default clickhouse-migrate clickhouse-aggregator clickhouse-query; do
    # A letter first: nats-server parses a password from its environment as a config value,
    # and one starting with a digit would be read as a number.
    [[ -s "$SECRETS/$name.password" ]] || printf 'p%s' "$(openssl rand -hex 24)" >"$SECRETS/$name.password"
  done
  if [[ ! -s "$DEMO_KEY" ]]; then
    printf 'demo-%s' "$(openssl rand -hex 24)" >"$DEMO_KEY"
    rm -f "$KEYS_FILE"
  fi
  if [[ ! -s "$KEYS_FILE" ]]; then
    printf '# <tenant> <key>: one line per key (the ingestor and the query API read this file)\ndemo %s\n' \
      "$(cat "$DEMO_KEY")" >"$KEYS_FILE"
  fi
)
secret() { cat "$SECRETS/$1.password"; }
pw_file() { echo "$SECRETS/$1.password"; }

# Keep the ports of a previous secure run so endpoints (and a browser's exception) stay stable.
senv_get() { [[ -f "$SECURE/endpoints.env" ]] && sed -n "s/^$1=//p" "$SECURE/endpoints.env" | tail -n1 || true; }
port_of() { sed -n 's#.*:\([0-9]*\)/*$#\1#p' <<<"$1"; }
NATS_PORT="$(port_of "$(senv_get CHUTE_NATS_URL)")"
CH_PORT="$(port_of "$(senv_get CHUTE_CLICKHOUSE_HTTP)")"
GRPC_PORT="$(port_of "$(senv_get CHUTE_INGEST_GRPC)")"
ADMIN_PORT="$(port_of "$(senv_get CHUTE_INGEST_ADMIN)")"
OTLP_GRPC_PORT="$(port_of "$(senv_get CHUTE_OTLP_GRPC)")"
OTLP_HTTP_PORT="$(port_of "$(senv_get CHUTE_OTLP_HTTP)")"
AGG_PORT="$(port_of "$(senv_get CHUTE_AGGREGATOR_ADMIN)")"
QUERY_PORT="$(port_of "$(senv_get CHUTE_QUERY_HTTP)")"
QUERY_ADMIN_PORT="$(port_of "$(senv_get CHUTE_QUERY_ADMIN)")"
ROUTER_PORT="$(port_of "$(senv_get CHUTE_ROUTER_ADMIN)")"

# --- NATS: TLS and the per-service users of deploy/nats/chute-nats.conf (passwords from env).
if is_running nats; then
  log "nats-server already running (pid $(cat "$LOCAL/nats.pid"), port $NATS_PORT)"
else
  NATS_PORT="$(pick_port "${NATS_PORT:-4222}")"
  {
    printf 'listen: "127.0.0.1:%s"\n' "$NATS_PORT"
    printf 'jetstream {\n  store_dir: "%s"\n}\n' "$SECURE/jetstream"
    printf 'tls {\n  cert_file: "%s"\n  key_file: "%s"\n  timeout: 5\n}\n' "$CERT" "$KEY"
    cat "$ROOT/deploy/nats/chute-nats.conf"
  } >"$SECURE/nats.conf"
  start nats env CHUTE_NATS_INGESTOR_PASSWORD="$(secret nats-ingestor)" \
    CHUTE_NATS_AGGREGATOR_PASSWORD="$(secret nats-aggregator)" \
    CHUTE_NATS_QUERY_API_PASSWORD="$(secret nats-query-api)" \
    CHUTE_NATS_ROUTER_PASSWORD="$(secret nats-router)" \
    CHUTE_NATS_OPERATOR_PASSWORD="$(secret nats-operator)" \
    nats-server -c "$SECURE/nats.conf"
  wait_port "$NATS_PORT" 20 nats
  log "nats-server started on tls://127.0.0.1:$NATS_PORT with per-service users (JetStream in $SECURE/jetstream)"
fi
NATS_URL="tls://127.0.0.1:$NATS_PORT"

# --- ClickHouse dev server: HTTPS, `default` with a password; migrate creates the services' users.
CH_URL="https://127.0.0.1:${CH_PORT:-8123}"
if is_running clickhouse; then
  log "ClickHouse dev server already running (pid $(cat "$LOCAL/clickhouse.pid"), $CH_URL)"
else
  CH_PORT="$(pick_port "${CH_PORT:-8123}")"
  CH_URL="https://127.0.0.1:$CH_PORT"
  start clickhouse "$PY" "$ROOT/clickhouse-dev/chserver.py" --host 127.0.0.1 --port "$CH_PORT" \
    --data-dir "$SECURE/clickhouse" --default-password-file "$(pw_file clickhouse-default)" \
    --tls-cert "$CERT" --tls-key "$KEY"
  CURL_CA_BUNDLE="$CA" wait_http "$CH_URL/ping" 120 clickhouse
  log "ClickHouse dev server started on $CH_URL (data in $SECURE/clickhouse)"
fi

log "applying ClickHouse migrations and creating the services' users (aggregator migrate as default)"
env CHUTE_CLICKHOUSE_URL="$CH_URL" CHUTE_CLICKHOUSE_CA="$CA" CHUTE_CLICKHOUSE_USER=default \
  CHUTE_CLICKHOUSE_PASSWORD_FILE="$(pw_file clickhouse-default)" \
  CHUTE_CLICKHOUSE_MIGRATE_PASSWORD_FILE="$(pw_file clickhouse-migrate)" \
  CHUTE_CLICKHOUSE_AGGREGATOR_PASSWORD_FILE="$(pw_file clickhouse-aggregator)" \
  CHUTE_CLICKHOUSE_QUERY_PASSWORD_FILE="$(pw_file clickhouse-query)" \
  "$BIN/aggregator" migrate --log warn

# What every service shares: NATS over TLS, ClickHouse over HTTPS, both verified against the CA.
nats_env() {  # nats_env USER PASSWORD-NAME INBOX-PREFIX
  echo CHUTE_NATS_URL="$NATS_URL" CHUTE_NATS_TLS_CA="$CA" CHUTE_NATS_USER="$1" \
    CHUTE_NATS_PASSWORD_FILE="$(pw_file "$2")" CHUTE_NATS_INBOX_PREFIX="$3"
}

if is_running ingestor; then
  log "ingestor already running (pid $(cat "$LOCAL/ingestor.pid"), gRPC 127.0.0.1:$GRPC_PORT)"
else
  GRPC_PORT="$(pick_port "${GRPC_PORT:-7400}")"
  ADMIN_PORT="$(pick_port "${ADMIN_PORT:-7401}")"
  OTLP_GRPC_PORT="$(pick_port "${OTLP_GRPC_PORT:-4317}")"
  OTLP_HTTP_PORT="$(pick_port "${OTLP_HTTP_PORT:-4318}")"
  # shellcheck disable=SC2046 # nats_env's words are KEY=value pairs without spaces
  start ingestor env $(nats_env chute-ingestor nats-ingestor _INBOX_ingestor) \
    CHUTE_TLS_CERT="$CERT" CHUTE_TLS_KEY="$KEY" CHUTE_API_KEYS_FILE="$KEYS_FILE" \
    "$BIN/ingestor" --grpc-listen "127.0.0.1:$GRPC_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --otlp-grpc-listen "127.0.0.1:$OTLP_GRPC_PORT" --otlp-http-listen "127.0.0.1:$OTLP_HTTP_PORT" \
    --stream-max-bytes "${CHUTE_STREAM_MAX_BYTES:-2GiB}"
  wait_http "http://127.0.0.1:$ADMIN_PORT/readyz" 30 ingestor
  log "ingestor started: gRPC+TLS 127.0.0.1:$GRPC_PORT, admin http://127.0.0.1:$ADMIN_PORT"
fi

if is_running aggregator; then
  log "aggregator already running (pid $(cat "$LOCAL/aggregator.pid"), admin http://127.0.0.1:$AGG_PORT)"
else
  AGG_PORT="$(pick_port "${AGG_PORT:-7410}")"
  # shellcheck disable=SC2046
  start aggregator env $(nats_env chute-aggregator nats-aggregator _INBOX_aggregator) \
    CHUTE_CLICKHOUSE_URL="$CH_URL" CHUTE_CLICKHOUSE_CA="$CA" CHUTE_CLICKHOUSE_USER=chute_aggregator \
    CHUTE_CLICKHOUSE_PASSWORD_FILE="$(pw_file clickhouse-aggregator)" \
    "$BIN/aggregator" --admin-listen "127.0.0.1:$AGG_PORT"
  wait_http "http://127.0.0.1:$AGG_PORT/readyz" 30 aggregator
  log "aggregator started: admin http://127.0.0.1:$AGG_PORT"
fi

if is_running query-api; then
  log "query API already running (pid $(cat "$LOCAL/query-api.pid"), https://127.0.0.1:$QUERY_PORT)"
else
  QUERY_PORT="$(pick_port "${QUERY_PORT:-7420}")"
  QUERY_ADMIN_PORT="$(pick_port "${QUERY_ADMIN_PORT:-7421}")"
  # shellcheck disable=SC2046
  start query-api env $(nats_env chute-query-api nats-query-api _INBOX) \
    CHUTE_CLICKHOUSE_URL="$CH_URL" CHUTE_CLICKHOUSE_CA="$CA" CHUTE_CLICKHOUSE_USER=chute_query \
    CHUTE_CLICKHOUSE_PASSWORD_FILE="$(pw_file clickhouse-query)" \
    CHUTE_TLS_CERT="$CERT" CHUTE_TLS_KEY="$KEY" CHUTE_API_KEYS_FILE="$KEYS_FILE" \
    "$BIN/query-api" --listen "127.0.0.1:$QUERY_PORT" --admin-listen "127.0.0.1:$QUERY_ADMIN_PORT"
  wait_http "http://127.0.0.1:$QUERY_ADMIN_PORT/readyz" 30 query-api
  log "query API started: https://127.0.0.1:$QUERY_PORT (admin http://127.0.0.1:$QUERY_ADMIN_PORT)"
fi

# The router: its own NATS user over TLS, ClickHouse as the read-only query user (it reads events
# and rollups to rebuild windows at start), the example rules with the `ops` webhook's secret.
RULES_FILE="${CHUTE_ROUTER_RULES_FILE:-$ROOT/deploy/rules.example.yaml}"
if is_running router; then
  log "router already running (pid $(cat "$LOCAL/router.pid"), admin http://127.0.0.1:$ROUTER_PORT)"
else
  ROUTER_PORT="$(pick_port "${ROUTER_PORT:-7430}")"
  CHUTE_WEBHOOK_OPS_SECRET="$(secret webhook-ops)" "$BIN/router" check --rules-file "$RULES_FILE" --log warn >/dev/null ||
    die "rules file $RULES_FILE does not validate"
  # shellcheck disable=SC2046
  start router env $(nats_env chute-router nats-router _INBOX_router) \
    CHUTE_CLICKHOUSE_URL="$CH_URL" CHUTE_CLICKHOUSE_CA="$CA" CHUTE_CLICKHOUSE_USER=chute_query \
    CHUTE_CLICKHOUSE_PASSWORD_FILE="$(pw_file clickhouse-query)" \
    CHUTE_WEBHOOK_OPS_SECRET="$(secret webhook-ops)" CHUTE_ROUTES_MAX_BYTES="${CHUTE_ROUTES_MAX_BYTES:-1GiB}" \
    "$BIN/router" --admin-listen "127.0.0.1:$ROUTER_PORT" --rules-file "$RULES_FILE"
  wait_http "http://127.0.0.1:$ROUTER_PORT/readyz" 60 router
  log "router started: admin http://127.0.0.1:$ROUTER_PORT, rules $RULES_FILE"
fi

QUERY="https://127.0.0.1:$QUERY_PORT"
cat >"$SECURE/endpoints.env" <<ENV
CHUTE_CA=$CA
CHUTE_API_KEYS_FILE=$KEYS_FILE
CHUTE_NATS_URL=$NATS_URL
CHUTE_CLICKHOUSE_HTTP=$CH_URL
CHUTE_INGEST_GRPC=127.0.0.1:$GRPC_PORT
CHUTE_INGEST_ADMIN=http://127.0.0.1:$ADMIN_PORT
CHUTE_OTLP_GRPC=https://127.0.0.1:$OTLP_GRPC_PORT
CHUTE_OTLP_HTTP=https://127.0.0.1:$OTLP_HTTP_PORT
CHUTE_AGGREGATOR_ADMIN=http://127.0.0.1:$AGG_PORT
CHUTE_QUERY_HTTP=$QUERY
CHUTE_QUERY_ADMIN=http://127.0.0.1:$QUERY_ADMIN_PORT
CHUTE_ROUTER_ADMIN=http://127.0.0.1:$ROUTER_PORT
ENV

from_ms=$(( ($(date +%s) - 600) * 1000 ))
# count_events: tenant demo's events of the last 10 minutes, through the query API with the key.
count_events() {
  curl -fsS --cacert "$CA" -H "authorization: Bearer $(cat "$DEMO_KEY")" "$QUERY/v1/events?from=$from_ms&limit=10000" |
    "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)["events"]))'
}
before="$(count_events)"
log "sending sample events to the ingestor over TLS with the demo tenant's API key"
CHUTE_API_KEY="$(cat "$DEMO_KEY")" "$PY" "$ROOT/scripts/send_sample.py" "127.0.0.1:$GRPC_PORT" --ca "$CA"
log "reading them back through the query API over HTTPS with the key: GET /v1/events"
found="$before"
for _ in $(seq 1 100); do
  found="$(count_events)"
  ((found >= before + 5)) && break
  sleep 0.2
done
((found >= before + 5)) || die "the query API shows $((found - before)) of the 5 sample events after 20 s (logs: $LOCAL/logs/)"
log "the query API returns $found events of tenant demo from the last 10 minutes ($((found - before)) new)"

cat <<MSG

Chute is up, secured: TLS on every hop, API keys, a NATS user and a ClickHouse user per service.
Endpoints in $SECURE/endpoints.env, pids in $LOCAL/*.pid, logs in $LOCAL/logs/.
Secrets (made once, mode 0600; delete $SECURE to make new ones):
  CA certificate           $CA   (trust it; its key signs the server certificate)
  API keys                 $KEYS_FILE   (tenant demo's key alone: $DEMO_KEY)
  NATS / ClickHouse users  $SECRETS/{nats,clickhouse}-*.password
  Webhook secret (ops)     $SECRETS/webhook-ops.password   (CHUTE_WEBHOOK_OPS_SECRET of the router)
Endpoints:
  Ingestor gRPC (TLS)      127.0.0.1:$GRPC_PORT      OTLP https://127.0.0.1:$OTLP_GRPC_PORT (gRPC) https://127.0.0.1:$OTLP_HTTP_PORT (HTTP)
  Query API (HTTPS)        $QUERY     admin (plain): http://127.0.0.1:$QUERY_ADMIN_PORT/metrics
  Router admin (plain)     http://127.0.0.1:$ROUTER_PORT/metrics   rules: $RULES_FILE (edit it live)
  NATS                     $NATS_URL    users chute-ingestor, chute-aggregator, chute-query-api, chute-router, chute-operator
  ClickHouse               $CH_URL    users default (admin), chute_migrate, chute_aggregator, chute_query
How a client uses them:
  curl --cacert $CA -H "authorization: Bearer \$(cat $DEMO_KEY)" '$QUERY/v1/events?from=$from_ms'
  CHUTE_API_KEY=\$(cat $DEMO_KEY) .venv/bin/python scripts/send_sample.py 127.0.0.1:$GRPC_PORT --ca $CA
  curl -N --cacert $CA -H "authorization: Bearer \$(cat $DEMO_KEY)" '$QUERY/v1/stream'
  curl --cacert $CA -u chute_query:\$(cat $SECRETS/clickhouse-query.password) '$CH_URL/?query=SELECT+count()+FROM+chute.events'
  Live page: $QUERY/ (import ca.pem into the browser or accept its warning; the page asks for the key)
Stop everything:    make down
MSG
