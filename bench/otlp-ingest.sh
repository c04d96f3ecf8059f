#!/bin/bash
# OTLP ingest beside chute.v1's (BENCHMARKS.md, "OTLP ingest"): for each run a fresh nats-server
# and release ingestor on fixed loopback ports, then `loadtest --protocol chute|otlp-grpc|otlp-http`,
# closed loop (16 workers) and open loop at 20k events/s, 10 s each, CPU per event of the
# ingestor and nats-server. Ingest only: no aggregator or ClickHouse (--no-verify); each run's
# JetStream data is deleted after it (1 GiB stream cap). Run from the repository root after
# `cargo build --release -p chute-ingestor -p chute-loadtest`; OUT= picks the result directory
# (default /tmp/otlpbench; it is emptied first).
set -u
D=${OUT:-/tmp/otlpbench}
rm -rf "$D"; mkdir -p "$D"
run() { # name protocol loadtest-flags...
  local name=$1 proto=$2; shift 2
  nats-server -p 24222 -js -sd "$D/js" > "$D/$name-nats.log" 2>&1 & local nats=$!
  sleep 1
  target/release/ingestor --nats-url nats://127.0.0.1:24222 --grpc-listen 127.0.0.1:27400 \
    --admin-listen 127.0.0.1:27401 --otlp-grpc-listen 127.0.0.1:24317 --otlp-http-listen 127.0.0.1:24318 \
    --stream-max-bytes 1GiB --log warn > "$D/$name-ingestor.log" 2>&1 & local ingestor=$!
  for _ in $(seq 1 50); do curl -sf 127.0.0.1:27401/readyz > /dev/null && break; sleep 0.2; done
  timeout 120 target/release/loadtest --grpc 127.0.0.1:27400 --otlp-http-url http://127.0.0.1:24318 \
    --nats-url nats://127.0.0.1:24222 --endpoints-file /nonexistent --protocol "$proto" \
    --no-verify --live off --no-progress --pid ingestor=$ingestor --pid nats-server=$nats \
    --out "$D/$name.json" "$@" > "$D/$name.txt" 2>&1
  echo "== $name"; grep -E "achieved rate|ack latency|(ingestor|nats-server) .*µs/event" "$D/$name.txt"
  kill $ingestor; wait $ingestor 2>/dev/null; kill $nats; wait $nats 2>/dev/null
  rm -rf "$D/js"
}
uptime
for proto in chute otlp-grpc otlp-http; do
  run "closed-$proto" "$proto" --mode closed --concurrency 16 --connections 2 --duration 10s
done
for proto in chute otlp-grpc otlp-http; do
  run "open20k-$proto" "$proto" --mode open --rate 20000 --duration 10s
done
uptime
