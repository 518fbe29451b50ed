#!/usr/bin/env bash
# Replays the worker's claim and success statements with pgbench on 100,000 jobs, on the
# schema as it was before `migrations/…_hot_jobs.sql` (its indexes on columns that claims
# and successes change) and then without those indexes, to show what HOT updates are
# worth on this machine without the rest of the stack (docs/performance.md).
#
#   bench/hot-replay/run.sh            # 3 runs of each, 4 clients, 32 jobs a statement
#
# Uses a scratch database `pinq_hot_replay` on $PGHOST (default 127.0.0.1), dropped at
# the end. The statements are the claim and success of the worker before that migration
# (lease columns on `jobs`), written out by hand in `claim_and_succeed.sql`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
. ../replay-lib.sh
db=pinq_hot_replay
replay_db "$db" hot_jobs.sql

replay() {
    for _ in $(seq "$runs"); do
        replay_psql "$db" -f setup.sql
        sleep 2
        replay_rate "$1" 40 32 -n -c 4 -j 2 -t 781 -f claim_and_succeed.sql "$db"
    done
}

replay "with the indexes the hot path changes"
replay_psql "$db" -c "DROP INDEX jobs_queued_since, jobs_lease, jobs_lease_owner, jobs_finished_age, jobs_retry_due" \
    -c "ALTER TABLE jobs SET (fillfactor = 50)"
replay "without them (HOT updates possible)"
