#!/usr/bin/env bash
# The full test run: formatting, lints, unit tests and end-to-end tests against real
# PostgreSQL, RabbitMQ and a real IPFS node. Starts (or installs) what the tests need.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source deploy/services.sh

ensure_postgres
ensure_rabbitmq
ensure_node
deploy/ipfs/install.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (the binaries the end-to-end tests start)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked
