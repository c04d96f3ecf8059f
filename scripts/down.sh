#!/usr/bin/env bash
# `make down`: stops what `make up` or `make up-cluster` started, by pid (nothing else), services
# before the stores they write to: every .local/<name>[-N].pid of each kind in turn.
source "$(dirname "$0")/lib.sh"
shopt -s nullglob
for pidfile in "$LOCAL"/loadtest*.pid "$LOCAL"/router*.pid "$LOCAL"/query-api*.pid "$LOCAL"/aggregator*.pid \
  "$LOCAL"/ingestor*.pid "$LOCAL"/clickhouse*.pid "$LOCAL"/nats*.pid; do
  name="$(basename "$pidfile" .pid)"
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { warn "$name (pid $pid) ignored SIGTERM for 10 s; killing"; kill -KILL "$pid"; }
    log "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
done
