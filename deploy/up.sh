#!/usr/bin/env bash
# Brings the whole local stack up and runs it in the foreground until Ctrl-C:
# PostgreSQL and RabbitMQ (started if down), a local IPFS node (installed and started),
# a release build of pinq, migrations, the `local` backend, then api + workers +
# scheduler under the launcher `pinq up`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source deploy/services.sh

ensure_postgres
ensure_rabbitmq
ensure_node

# Settings: .env if present, else a fresh one from .env.example with a random token.
if [[ ! -f .env ]]; then
  token=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  sed "s/^PINQ_ADMIN_TOKEN=.*/PINQ_ADMIN_TOKEN=$token/" .env.example > .env
  echo "wrote .env with a new admin token (PINQ_ADMIN_TOKEN)" >&2
fi
set -a
# shellcheck disable=SC1091
source .env
set +a

state=target/pinq-dev
mkdir -p "$state"

# The local IPFS node, unless something already answers on its port. It runs in a session
# of its own (setsid), so a Ctrl-C in the terminal does not reach it: it must outlive
# `pinq up`, whose workers still pin on it while they drain, and is stopped by the EXIT
# trap only once `pinq up` has exited (or when the script fails before that).
ipfs_port=${IPFS_API_PORT:-5001}
ipfs_pid=
stop_ipfs() { [[ -n "$ipfs_pid" ]] && kill -TERM "$ipfs_pid" 2>/dev/null && wait "$ipfs_pid" 2>/dev/null; true; }
trap stop_ipfs EXIT
ipfs_log_tail() { echo "last lines of $state/ipfs.log:" >&2; tail -n 20 "$state/ipfs.log" >&2 || true; }
if port_open "$ipfs_port"; then
  echo "an IPFS API already answers on 127.0.0.1:$ipfs_port; using it" >&2
else
  deploy/ipfs/install.sh
  # A background job of a script is never a process group leader, so setsid does not fork
  # and $! is the node's own pid.
  setsid node deploy/ipfs/node.mjs --repo "$state/ipfs-repo" --api-port "$ipfs_port" > "$state/ipfs.log" 2>&1 &
  ipfs_pid=$!
  # Wait up to 60 s for its port, but give up at once if the node has exited.
  deadline=$((SECONDS + 60))
  while ((SECONDS < deadline)); do
    port_open "$ipfs_port" && break
    if ! kill -0 "$ipfs_pid" 2>/dev/null; then
      ipfs_status=0
      wait "$ipfs_pid" || ipfs_status=$?
      ipfs_pid=
      echo "error: the IPFS node exited (status $ipfs_status) before opening 127.0.0.1:$ipfs_port" >&2
      ipfs_log_tail
      exit 1
    fi
    sleep 0.1
  done
  if ! port_open "$ipfs_port"; then
    echo "error: the IPFS node did not open 127.0.0.1:$ipfs_port within 60 s" >&2
    ipfs_log_tail
    exit 1
  fi
  echo "IPFS node on http://127.0.0.1:$ipfs_port (log: $state/ipfs.log)" >&2
fi

cargo build --release --locked --bins

# `pinq up` migrates, registers the backend, supervises the services, and shuts them
# down in order on SIGINT or SIGTERM; a second signal makes it stop waiting and kill.
# It too runs in a session of its own, so a Ctrl-C reaches only this script, which
# passes each SIGINT, SIGTERM or SIGHUP it gets on as exactly one SIGTERM: one Ctrl-C is
# one graceful stop, a second Ctrl-C the impatient one.
up_pid=
stop_pending=0
stop_up() {
  if [[ -n "$up_pid" ]]; then kill -TERM "$up_pid" 2>/dev/null || true; else stop_pending=1; fi
}
trap stop_up INT TERM HUP
setsid target/release/pinq up --workers "${PINQ_WORKERS:-2}" --backend "local=http://127.0.0.1:$ipfs_port" &
up_pid=$!
# A signal that came while `pinq up` was being started is passed on now.
if ((stop_pending)); then kill -TERM "$up_pid" 2>/dev/null || true; fi
while :; do
  status=0
  wait "$up_pid" || status=$?
  # A trapped signal ends `wait` early (status > 128) while `pinq up` is still draining;
  # wait again until it has exited, and only then let the EXIT trap stop the node.
  if ((status > 128)) && kill -0 "$up_pid" 2>/dev/null; then continue; fi
  break
done
exit "$status"
