#!/usr/bin/env bash
# What the index on a job's CID costs the batch insert: 200,000 jobs with random CIDs
# inserted 10,000 a statement by 4 pgbench clients into a fresh `jobs`, with the B-tree on
# `(cid_key, backend_id)` that the schema had before `migrations/…_hash_cid_indexes.sql`
# and with the hash index on `cid_key` it has since, taking turns (docs/performance.md).
#
#   bench/cid-index-replay/run.sh      # 3 rounds, each variant once a round
#
# Uses a scratch database `pinq_cid_index_replay` on $PGHOST (default 127.0.0.1),
# migrated with migrations/*.sql and dropped at the end. The statement is a plain
# INSERT … SELECT (the batch insert's jobs, without its batch row and outbox row).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
. ../replay-lib.sh
db=pinq_cid_index_replay
replay_db "$db"

variant() {
    case $1 in
        btree) echo "CREATE INDEX jobs_cid_key ON jobs (cid_key, backend_id)" ;;
        hash) echo "CREATE INDEX jobs_cid_key ON jobs USING hash (cid_key)" ;;
    esac
}

for round in $(seq "$runs"); do
    order="btree hash"
    if [ $((round % 2)) -eq 0 ]; then order="hash btree"; fi
    for v in $order; do
        replay_psql "$db" -f setup.sql -c "DROP INDEX jobs_cid_key" -c "$(variant "$v")" -c CHECKPOINT
        sleep 1
        replay_rate "$v" 8 10000 -n -c 4 -j 2 -t 5 -f insert.sql "$db"
    done
done
