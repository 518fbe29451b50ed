#!/usr/bin/env bash
# The floor under issue 7's end-to-end target: what PostgreSQL alone costs on this machine
# for the writes DESIGN.md requires of every job, with nothing of pinq's own around them
# (docs/performance.md, "The floor").
#
#   bench/floor/run.sh                 # 3 rounds of each variant
#
# A job is inserted (batches of 10,000 jobs a statement, 4 clients, as the ingest
# scenario sends them), claimed by a fenced UPDATE (queued → running, attempt + 1, lease)
# and finished by a fenced UPDATE (→ succeeded where the lease and attempt are still the
# claimer's), claims and finishes 128 jobs a statement, each statement its own commit
# (4 clients). The two phases run one after the other, on 200,000 jobs.
#
#   bare   the job row with its primary key only (schema.sql): no job tallies, no
#          index on CIDs, no batch, outbox or claim rows, no pin index
#   pins   the same, and the finish also inserts each job's pin-index row
#   order  the same, and a hash index on CIDs, which the claim uses to keep one CID's
#          jobs in order (a job waits while another on its CID runs or an earlier one
#          waits), as pinq's claim does
#
# For each phase, the script reads the whole machine's busy CPU time (/proc/stat) and
# pgbench's own, and prints the rates and the CPU a job, so that the figures compare
# with the end-to-end scenario's `cpu_per_job`. Uses a scratch database `pinq_floor` on
# $PGHOST (default 127.0.0.1), dropped at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
. ../replay-lib.sh
db=pinq_floor
jobs=200000
replay_scratch_db "$db"

busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# CPU ticks of the children this shell has waited for (pgbench's, psql's).
child_ticks() { awk '{print $16 + $17}' "/proc/$$/stat"; }
ticks_per_s=$(getconf CLK_TCK)

# Runs one phase; sets wall (s), cpu (machine busy CPU-s) and own (pgbench's CPU-s).
# Arguments: label, transactions per client, pgbench's other arguments (script, -D).
phase() {
    local label=$1 per_client=$2 b0 k0 t0 t1
    shift 2
    b0=$(busy_ticks)
    k0=$(child_ticks)
    t0=$(date +%s.%N)
    replay_pgbench "$label" -n -c 4 -j 2 -t "$per_client" "$@" "$db"
    t1=$(date +%s.%N)
    wall=$(echo "$t1 - $t0" | bc -l)
    cpu=$(echo "($(busy_ticks) - $b0) / $ticks_per_s" | bc -l)
    own=$(echo "($(child_ticks) - $k0) / $ticks_per_s" | bc -l)
}

one() { # variant, pins (0 or 1), order (0 or 1)
    local index="SELECT 1"
    if [ "$3" = 1 ]; then index="CREATE INDEX jobs_cid ON jobs USING hash (cid)"; fi
    replay_psql "$db" -f schema.sql -c "$index" -c CHECKPOINT
    sleep 1
    phase "$1 ingest" $((jobs / 10000 / 4)) -f insert.sql
    local iw=$wall ic=$cpu io=$own
    replay_psql "$db" -c "SELECT setval('chunk', 0, false)"
    phase "$1 claim and finish" $(((jobs + 128 * 4 - 1) / (128 * 4))) \
        -D pins="$2" -D order="$3" -f claim_finish.sql
    local done pinned
    done=$(psql -qXAt -d "$db" -c "SELECT count(*) FROM jobs WHERE state = 'succeeded' AND attempt = 1")
    pinned=$(psql -qXAt -d "$db" -c "SELECT count(*) FROM pins")
    if [ "$done" -ne "$jobs" ] || [ "$pinned" -ne $(($2 * jobs)) ]; then
        echo "$1: $done of $jobs jobs succeeded, $pinned pin-index rows" >&2
        exit 1
    fi
    awk -v v="$1" -v n="$jobs" -v iw="$iw" -v ic="$ic" -v io="$io" -v w="$wall" -v c="$cpu" -v o="$own" 'BEGIN {
        printf("%-5s %9.0f %10.0f %10.0f %8.1f %8.1f %8.1f %8.1f\n", v, n / iw, n / w, n / (iw + w),
               ic / n * 1e6, c / n * 1e6, (ic + c) / n * 1e6, (io + o) / n * 1e6)}'
}

printf "%-5s %9s %10s %10s %8s %8s %8s %8s\n" "" "ingest" "claim+fin" "both" "µs/job" "µs/job" "µs/job" "pgbench"
printf "%-5s %9s %10s %10s %8s %8s %8s %8s\n" variant "ops/s" "jobs/s" "jobs/s" ingest claim+f total "µs/job"
for round in $(seq "$runs"); do
    order="bare pins order"
    if [ $((round % 2)) -eq 0 ]; then order="order pins bare"; fi
    for v in $order; do
        case $v in
            bare) one bare 0 0 ;;
            pins) one pins 1 0 ;;
            order) one order 1 1 ;;
        esac
    done
done
