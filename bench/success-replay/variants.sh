#!/usr/bin/env bash
# Where a group of successes spends PostgreSQL's time: replays, with pgbench, the shape of
# today's success statement (`current.sql`: 32 running jobs locked in id order, marked
# succeeded, their pin-index upserts) against the same statement with one part taken away
# at a time (docs/performance.md, "Where the time goes"):
#
#   nolock     no `FOR UPDATE` of the jobs before the update (the update locks them itself,
#              in the plan's order)
#   plain      the pins inserted without `ON CONFLICT` (every pin is new here)
#   nopinscid  without the `pins_cid` index
#   notrigger  without the job-tally trigger on updates (`jobs_tally_update`)
#
#   bench/success-replay/variants.sh   # 3 rounds, 4 clients, 32 jobs a statement
#
# Each round starts one variant later than the round before (the order stays cyclic), so
# that with five rounds or more each variant runs first once while the machine's speed
# drifts.
#
# Uses a scratch database `pinq_success_variants` on $PGHOST (default 127.0.0.1), migrated
# with migrations/*.sql and dropped at the end; the settings are those of run.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
. ../replay-lib.sh
db=pinq_success_variants
replay_db "$db"
tmp=$replay_tmp
sed 's/ ORDER BY j.id FOR UPDATE OF j//' current.sql >"$tmp/nolock.sql"
# Everything from ON CONFLICT to the end of the upsert goes.
sed -e '/ON CONFLICT/d' -e 's/FROM done ORDER BY backend_id, cid$/FROM done ORDER BY backend_id, cid)/' \
    current.sql >"$tmp/plain.sql"

one() { # label, statement file, SQL before, SQL after
    replay_psql "$db" -f setup.sql
    if [ -n "$3" ]; then replay_psql "$db" -c "$3"; fi
    sleep 1
    PGOPTIONS='-c plan_cache_mode=force_generic_plan -c enable_hashjoin=off -c enable_mergejoin=off' \
        replay_rate "$1" 10 32 -n -M prepared -c 4 -j 2 -t 781 -f "$2" "$db"
    if [ -n "$4" ]; then replay_psql "$db" -c "$4"; fi
}

variant() {
    case "$1" in
    current) one current current.sql "" "" ;;
    nolock) one nolock "$tmp/nolock.sql" "" "" ;;
    plain) one plain "$tmp/plain.sql" "" "" ;;
    nopinscid) one nopinscid current.sql "DROP INDEX pins_cid" "CREATE INDEX pins_cid ON pins (cid)" ;;
    notrigger) one notrigger current.sql "ALTER TABLE jobs DISABLE TRIGGER jobs_tally_update" \
        "ALTER TABLE jobs ENABLE TRIGGER jobs_tally_update" ;;
    esac
}

variants=(current nolock plain nopinscid notrigger)
for round in $(seq 0 $((runs - 1))); do
    for i in "${!variants[@]}"; do
        variant "${variants[$(((i + round) % ${#variants[@]}))]}"
    done
done
