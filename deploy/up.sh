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

# The local IPFS node, unless something already answers on its port.
ipfs_port=${IPFS_API_PORT:-5001}
ipfs_pid=
if port_open "$ipfs_port"; then
  echo "an IPFS API already answers on 127.0.0.1:$ipfs_port; using it" >&2
else
  deploy/ipfs/install.sh
  node deploy/ipfs/node.mjs --repo "$state/ipfs-repo" --api-port "$ipfs_port" > "$state/ipfs.log" 2>&1 &
  ipfs_pid=$!
  wait_port "$ipfs_port" 60 "the IPFS node (log: $state/ipfs.log)"
  echo "IPFS node on http://127.0.0.1:$ipfs_port (log: $state/ipfs.log)" >&2
fi
stop_ipfs() { [[ -n "$ipfs_pid" ]] && kill -TERM "$ipfs_pid" 2>/dev/null && wait "$ipfs_pid" 2>/dev/null; true; }
trap stop_ipfs EXIT

cargo build --release --locked --bins

# `pinq up` migrates, registers the backend, supervises the services, and shuts them
# down in order on Ctrl-C or SIGTERM.
target/release/pinq up --workers "${PINQ_WORKERS:-2}" --backend "local=http://127.0.0.1:$ipfs_port" &
up_pid=$!
trap 'kill -TERM "$up_pid" 2>/dev/null' INT TERM
status=0
wait "$up_pid" || status=$?
# A signal interrupts the first wait; wait again for the orderly shutdown to finish.
if kill -0 "$up_pid" 2>/dev/null; then wait "$up_pid" || status=$?; fi
exit "$status"
