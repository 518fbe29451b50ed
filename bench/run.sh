#!/usr/bin/env bash
# The one command for pinq's full-stack benchmark (issue 7; docs/performance.md):
#
#   bench/run.sh                          # every scenario, default sizes
#   bench/run.sh --scenario e2e --jobs 20000   # any flag of the bench example
#
# Builds the release binaries and the bench example, makes sure PostgreSQL, RabbitMQ,
# Node.js and the local js-ipfs node are installed and running, runs
# tests/examples/bench/main.rs, and writes its JSON report to bench/results/latest.json
# (the table and the JSON also go to stdout). Every stack it starts is private (a fresh
# database, a unique queue) and removed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source deploy/services.sh

ensure_postgres
ensure_rabbitmq
ensure_node
deploy/ipfs/install.sh

echo "== cargo build --release (binaries and the bench example)" >&2
cargo build --release --workspace --bins --locked
cargo build --release -p pinq-e2e --example bench --locked

mkdir -p bench/results
# The example finds target/release/pinq-* next to itself (pinq_e2e::bin_path).
exec target/release/examples/bench --json bench/results/latest.json "$@"
