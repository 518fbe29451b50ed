# Shared by the pgbench replays under bench/ (sourced, not run). Both helpers keep their
# commands' output out of the way when they succeed, and stop the script with it when
# they do not, so that a replay never prints a rate for statements that failed.

# Runs an SQL file on the database quietly (notices included); stops the script with
# psql's errors if it fails. Arguments: database, file.
replay_sql() {
    local err
    err=$(mktemp)
    if ! psql -qX -v ON_ERROR_STOP=1 -d "$1" -f "$2" >/dev/null 2>"$err"; then
        echo "psql -f $2 failed:" >&2
        cat "$err" >&2
        rm -f "$err"
        exit 1
    fi
    rm -f "$err"
}

# Runs pgbench and prints "<label> <rate> jobs/s", its transactions per second times the
# jobs a transaction handles. Stops the script with pgbench's output if pgbench fails,
# reports an error or a failed transaction, or prints no rate.
# Arguments: label, label width, jobs per transaction, pgbench's arguments.
replay_rate() {
    local label=$1 width=$2 per=$3 out err
    shift 3
    out=$(mktemp)
    err=$(mktemp)
    if ! pgbench "$@" >"$out" 2>"$err" || grep -qiE 'error|abort' "$err" ||
        grep -qE '^number of failed transactions: [1-9]' "$out" || ! grep -q '^tps' "$out"; then
        echo "pgbench failed ($label):" >&2
        cat "$err" "$out" >&2
        rm -f "$out" "$err"
        exit 1
    fi
    awk -v what="$label" -v w="$width" -v per="$per" \
        '/^tps/ {printf("%-" w "s %8.0f jobs/s\n", what, $3 * per)}' "$out"
    rm -f "$out" "$err"
}
