#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks: nats-server, curl, promtool, nodejs, chromium, and the
# Python venv (.venv).
source "$(dirname "$0")/lib.sh"

need_apt=()
command -v nats-server >/dev/null || need_apt+=(nats-server)
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)  # clickhouse-dev/tests: a throwaway CA for HTTPS
command -v promtool >/dev/null || need_apt+=(prometheus)
# The live page: its JS unit tests run under Node, its browser test drives headless Chromium.
command -v node >/dev/null || need_apt+=(nodejs)
command -v chromium >/dev/null || need_apt+=(chromium)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]} with apt-get"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

stamp="$ROOT/.venv/.requirements.sha"
want="$(cat "$ROOT/requirements-dev.txt" "$ROOT/clickhouse-dev/requirements.txt" "$ROOT/deploy/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$PY" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  log "preparing the Python venv .venv (chdb-core is a large wheel; first time takes a minute)"
  [[ -x "$PY" ]] || python3 -m venv "$ROOT/.venv"
  "$PY" -m pip install -q --upgrade pip >/dev/null
  "$PY" -m pip install -q -r "$ROOT/requirements-dev.txt"
  echo "$want" >"$stamp"
fi
