#!/usr/bin/env bash
# `make down`: stops what `make up` started, by pid (nothing else), newest first.
source "$(dirname "$0")/lib.sh"
for name in loadtest query-api aggregator ingestor clickhouse nats; do
  pidfile="$LOCAL/$name.pid"
  [[ -f "$pidfile" ]] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { warn "$name (pid $pid) ignored SIGTERM for 10 s; killing"; kill -KILL "$pid"; }
    log "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
done
