#!/usr/bin/env bash
# What the attempt record costs a group of successes: replays, with pgbench, the shape the
# worker's success statement had until successes were recorded on the job's row (the
# fenced update of 32 running jobs, their attempt records and their pin-index upserts, as
# data-modifying CTEs) against the same statement without the attempt records, on 100,000
# running jobs (docs/performance.md). The second is close to today's statement, which
# also sets `succeeded_by`.
#
#   bench/success-replay/run.sh        # 3 runs of each, 4 clients, 32 jobs a statement
#
# Uses a scratch database `pinq_success_replay` on $PGHOST (default 127.0.0.1), migrated
# with migrations/*.sql and dropped at the end. The statements pick their 32 jobs by
# sequence number instead of by the worker's id arrays, so the replay forces the nested
# loops the production statement gets from its arrays (hash joins off).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
. ../replay-lib.sh
db=pinq_success_replay
replay_db "$db"

# The two take turns going first, round by round.
for round in $(seq "$runs"); do
    order="with_attempt without_attempt"
    if [ $((round % 2)) -eq 0 ]; then order="without_attempt with_attempt"; fi
    for v in $order; do
        replay_psql "$db" -f setup.sql
        sleep 1
        PGOPTIONS='-c plan_cache_mode=force_generic_plan -c enable_hashjoin=off -c enable_mergejoin=off' \
            replay_rate "$v" 18 32 -n -M prepared -c 4 -j 2 -t 781 -f "$v.sql" "$db"
    done
done
