#!/usr/bin/env bash
# What the job tallies' update trigger costs a large group of successes, depending on the
# first update of `jobs` its connection made (migrations/…_tally_hash_join.sql):
# PL/pgSQL plans the trigger's join of the old rows to the new ones once per session, with
# the sizes of the first call, and keeps that plan.
#
#   as-migrated        the trigger as the migrations leave it (nested loops off inside it);
#                      the session's first update marks 1 job succeeded
#   free, first 1      the trigger's planner setting reset; first update of 1 job
#   free, first 560    the same, first update of 560 jobs
#
# Each then marks 5 groups of 560 running jobs succeeded, one statement a group, the way
# the worker's success statement updates them, and the script prints the time of each
# statement (psql's \timing, client side) and their mean.
#
#   bench/tally-replay/run.sh          # 3 rounds
#
# Uses a scratch database `pinq_tally_replay` on $PGHOST (default 127.0.0.1), migrated with
# migrations/*.sql and dropped at the end; the 100,000 running jobs of
# bench/success-replay/setup.sql. Each round starts one variant later than the one before.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
. ../replay-lib.sh
db=pinq_tally_replay
replay_db "$db"
replay_psql "$db" -f ../success-replay/setup.sql

group=560
next=1 # the next running job's seq

succeed() { # first seq, last seq
    echo "UPDATE jobs SET state = 'succeeded', succeeded_by = lease_owner, lease_owner = NULL,
          finished_at = now(), updated_at = now()
          WHERE batch_id = '00000000-0000-0000-0000-0000000000ba' AND seq BETWEEN $1 AND $2
            AND state = 'running';"
}

one() { # label, setting SQL, size of the first update
    replay_psql "$db" -c "$2"
    local sql=$replay_tmp/session.sql out=$replay_tmp/session.out
    {
        succeed "$next" $((next + $3 - 1))
        echo '\timing on'
        next=$((next + $3))
        for _ in 1 2 3 4 5; do
            succeed "$next" $((next + group - 1))
            next=$((next + group))
        done
    } >"$sql"
    if ! psql -X -v ON_ERROR_STOP=1 -d "$db" -f "$sql" >"$out" 2>&1 ||
        [ "$(sed -n '/^Timing is on/,$p' "$out" | grep -c "^UPDATE $group\$")" -ne 5 ]; then
        echo "the replay's updates failed ($1):" >&2
        cat "$out" >&2
        exit 1
    fi
    awk -v what="$1" -v g="$group" '/^Time:/ {t[n++] = $2; s += $2}
        END {printf("%-16s", what); for (i = 0; i < n; i++) printf(" %7.1f", t[i]);
             printf("   mean %6.1f ms per %d jobs\n", s / n, g)}' "$out"
}

variant() {
    local keep='ALTER FUNCTION pinq_tally_updated_jobs() SET enable_nestloop = off'
    local free='ALTER FUNCTION pinq_tally_updated_jobs() RESET enable_nestloop'
    case "$1" in
    migrated) one as-migrated "$keep" 1 ;;
    free1) one "free, first 1" "$free" 1 ;;
    free560) one "free, first 560" "$free" "$group" ;;
    esac
}

variants=(migrated free1 free560)
for round in $(seq 0 $((runs - 1))); do
    for i in "${!variants[@]}"; do
        variant "${variants[$(((i + round) % ${#variants[@]}))]}"
    done
done
