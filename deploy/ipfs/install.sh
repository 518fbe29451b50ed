#!/usr/bin/env bash
# Install the pinned js-ipfs dependencies for node.mjs (idempotent, fast when up to date).
# Re-runs `npm ci` only when node_modules is missing or older than package-lock.json.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

stamp=node_modules/.package-lock.json   # written by npm at the end of every install

if [[ -d node_modules && -f "$stamp" && ! package-lock.json -nt "$stamp" ]]; then
  exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "install.sh: npm not found (Node >= 18 required)" >&2; exit 1; }

echo "install.sh: installing js-ipfs dependencies in $(pwd)" >&2
npm ci --omit=optional --ignore-scripts --no-audit --no-fund >&2
# npm preserves file mtimes from the lockfile; make the freshness stamp unambiguous.
touch "$stamp"
