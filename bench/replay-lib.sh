# Shared by the pgbench replays under bench/ (sourced by each, from its own folder). The
# helpers keep their commands' output out of the way when they succeed, and stop the
# script with it when they do not, so that a replay never prints a rate for statements
# that failed.

export PGHOST="${PGHOST:-127.0.0.1}" PGUSER="${PGUSER:-postgres}"
runs="${RUNS:-3}"
# The replay's scratch files (and the helpers' captured output), removed at exit.
replay_tmp=$(mktemp -d)
trap 'rm -rf "$replay_tmp"' EXIT

# Runs psql on the database quietly (notices included); stops the script with psql's
# errors if it fails. Arguments: database, then psql's arguments (-f FILE, -c SQL, ...).
replay_psql() {
    local db=$1
    shift
    if ! psql -qX -v ON_ERROR_STOP=1 -d "$db" "$@" >/dev/null 2>"$replay_tmp/psql.err"; then
        echo "psql $* failed:" >&2
        cat "$replay_tmp/psql.err" >&2
        exit 1
    fi
}

# Creates the empty scratch database, which is dropped at exit. Argument: database.
replay_scratch_db() {
    replay_psql postgres -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1"
    trap 'psql -qX -c "DROP DATABASE IF EXISTS '"$1"'" >/dev/null; rm -rf "$replay_tmp"' EXIT
}

# Creates the scratch database, which is dropped at exit, and migrates it with
# migrations/*.sql, each in one transaction; with a second argument, only the migrations
# before the first whose name ends with it. Arguments: database[, last migration's end].
replay_db() {
    replay_scratch_db "$1"
    local m
    for m in ../../migrations/*.sql; do
        if [ -n "${2:-}" ]; then case "$m" in *"$2") break ;; esac; fi
        replay_psql "$1" -1 -f "$m"
    done
}

# Runs pgbench with its report in $replay_tmp/pgbench.out. Stops the script with pgbench's
# output if pgbench fails, reports an error or a failed transaction, or prints no rate.
# Arguments: label (for the error), pgbench's arguments.
replay_pgbench() {
    local label=$1 out=$replay_tmp/pgbench.out err=$replay_tmp/pgbench.err
    shift
    if ! pgbench "$@" >"$out" 2>"$err" || grep -qiE 'error|abort' "$err" ||
        grep -qE '^number of failed transactions: [1-9]' "$out" || ! grep -q '^tps' "$out"; then
        echo "pgbench failed ($label):" >&2
        cat "$err" "$out" >&2
        exit 1
    fi
}

# Runs pgbench and prints "<label> <rate> jobs/s", its transactions per second times the
# jobs a transaction handles; stops the script as replay_pgbench does.
# Arguments: label, label width, jobs per transaction, pgbench's arguments.
replay_rate() {
    local label=$1 width=$2 per=$3
    shift 3
    replay_pgbench "$label" "$@"
    awk -v what="$label" -v w="$width" -v per="$per" \
        '/^tps/ {printf("%-" w "s %8.0f jobs/s\n", what, $3 * per)}' "$replay_tmp/pgbench.out"
}
