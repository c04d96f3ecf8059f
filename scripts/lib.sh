# Shared helpers for scripts/*.sh (sourced).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# State (pids, logs, data): .local by default; CHUTE_LOCAL_DIR moves it (tests use a temp dir).
LOCAL="${CHUTE_LOCAL_DIR:-$ROOT/.local}"
PY="$ROOT/.venv/bin/python"

log() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33m!!\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31mxx\033[0m %s\n' "$*" >&2; exit 1; }

# is_running NAME: the pid in .local/NAME.pid is alive.
is_running() {
  local pidfile="$LOCAL/$1.pid"
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# port_free PORT
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# pick_port DEFAULT: DEFAULT when free, else an ephemeral free port (always one with
# CHUTE_EPHEMERAL_PORTS=1, so a test never takes the default ports of a developer's `make up`).
pick_port() {
  if [[ "${CHUTE_EPHEMERAL_PORTS:-}" != 1 ]] && port_free "$1"; then echo "$1"; else "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; fi
}

# wait_port PORT SECONDS NAME
wait_port() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    port_free "$1" || return 0
    sleep 0.1
  done
  die "$3 did not listen on 127.0.0.1:$1 within $2 s (log: $LOCAL/logs/$3.log)"
}

# last_error NAME: the last "Error: ..." line NAME logged (what a service prints when it exits).
last_error() { grep -a '^Error: ' "$LOCAL/logs/$1.log" 2>/dev/null | tail -n1 || true; }

# wait_http URL SECONDS NAME: fails at once, with the service's own error, when NAME exited.
wait_http() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    if [[ -f "$LOCAL/$3.pid" ]] && ! is_running "$3"; then
      die "$3 exited instead of answering $1: $(last_error "$3") (log: $LOCAL/logs/$3.log)"
    fi
    sleep 0.1
  done
  die "$3 did not answer $1 within $2 s $(last_error "$3") (log: $LOCAL/logs/$3.log)"
}

# start NAME CMD...: runs CMD in the background, logging to .local/logs/NAME.log.
start() {
  local name="$1"; shift
  mkdir -p "$LOCAL/logs"
  nohup "$@" >>"$LOCAL/logs/$name.log" 2>&1 &
  echo $! >"$LOCAL/$name.pid"
}

# env_get KEY: the value of KEY in .local/endpoints.env (empty when absent). A list (several
# URLs, written by `make up-cluster`) is not one endpoint to keep: empty too.
env_get() {
  local value=""
  [[ -f "$LOCAL/endpoints.env" ]] && value="$(sed -n "s/^$1=//p" "$LOCAL/endpoints.env" | tail -n1)"
  [[ "$value" == *,* ]] && value=""
  printf '%s' "$value"
}

# claim_mode open|secure: `make up` and `CHUTE_SECURE=1 make up` run different processes
# (TLS, users) on the same pid files; joining a running pipeline of the other mode would leave
# services that cannot talk to each other, so refuse until `make down`. The mode of the running
# processes is recorded in .local/mode.
claim_mode() {
  local want="$1" current="open" pidfile alive=""
  [[ -f "$LOCAL/mode" ]] && current="$(cat "$LOCAL/mode")"
  for pidfile in "$LOCAL"/*.pid; do
    [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && alive+=" $(basename "$pidfile" .pid)"
  done
  # `make up-cluster` (nats-1, ingestor-2, ...) always runs open.
  [[ "$alive" =~ -[0-9]+( |$) ]] && current="open"
  if [[ -n "$alive" && "$current" != "$want" ]]; then
    die "a pipeline started in $current mode is running ($alive ); run 'make down' first, then start the $want one"
  fi
  mkdir -p "$LOCAL"
  echo "$want" >"$LOCAL/mode"
}
