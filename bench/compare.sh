#!/usr/bin/env bash
# bench/compare.sh — the "comparison side" of the hot-SKU benchmark.
#
# Runs the same hot-SKU workload ("decrement one stock counter if positive",
# durably) against two throwaway reference servers on this machine, so Surge's
# own figure can be read as a ratio measured in the same run on the same
# (shared, noisy) box rather than against absolute numbers from another day:
#
#   * Redis, `appendonly yes` + `appendfsync always`, a Lua script via EVALSHA
#     on one key, driven by redis-benchmark (no pipelining);
#   * PostgreSQL, fsync on, default synchronous_commit, a one-row table updated
#     by `UPDATE stock SET qty = qty - 1 WHERE sku = 1 AND qty > 0`, driven by
#     pgbench.
#
# Both servers listen on 127.0.0.1 only, live in a mktemp directory (under
# /var/tmp by default: it must be a real disk, fsync is the point) and are
# stopped and removed on exit (normal or not).
#
# Usage: bench/compare.sh [--clients N] [--seconds S] [--json PATH|-]
#                         [--surge-json PATH]... [--dir DIR] [--no-install]
# See usage() below.

set -euo pipefail

# ---------------------------------------------------------------- settings --

CLIENTS=64
DURATION=10            # seconds; not $SECONDS, which bash reserves
JSON_OUT=""            # empty: no JSON; "-": JSON on stdout
SURGE_JSONS=()         # surge bench summaries to put beside the references
ALLOW_INSTALL=1
BASE_DIR=/var/tmp      # where the throwaway data directories go

# Large enough that the counter never reaches zero during a run (~10^5 ops/s
# for minutes is ~10^8), so every operation does real work; still a valid
# signed 64-bit integer for Redis INCR/DECR and PostgreSQL bigint.
INITIAL_STOCK=1000000000000000

# The "decrement if positive" script, the same logic as the SQL UPDATE.
# GET+DECR inside Lua is atomic in Redis (scripts run to completion).
REDIS_LUA='local v = tonumber(redis.call("GET", KEYS[1]))
if v and v > 0 then return redis.call("DECR", KEYS[1]) end
return -1'

PG_SQL='UPDATE stock SET qty = qty - 1 WHERE sku = 1 AND qty > 0;'

# Filled in as we go; read by cleanup().
WORKDIR=""
REDIS_PID=""
REDIS_PORT=""
PG_BIN=""
PG_DATA=""
PG_RUNAS=()            # command prefix that runs a postgres server binary
PG_STARTED=0
APT_UPDATED=0

# ----------------------------------------------------------------- helpers --

usage() {
    cat <<EOF
Usage: $0 [options]

Hot-SKU comparison: Redis (Lua decrement-if-positive, appendfsync always)
vs PostgreSQL (one-row UPDATE, fsync on), same client count and duration.

  --clients N        concurrent client connections for both (default $CLIENTS)
  --seconds S        measured duration of each run, in seconds (default $DURATION)
  --json PATH        also write the results as JSON to PATH ("-" for stdout)
  --surge-json PATH  read Surge's own summary ({"throughput_per_s": X,
                     "p50_ms": .., "p99_ms": ..}, from
                     \`surge bench --summary-json PATH\`) and print ratios;
                     repeat it for several (one node, the cluster, ...)
  --dir DIR          parent of the throwaway data directories (default
                     $BASE_DIR; must be a real disk, not tmpfs)
  --no-install       never run apt-get; fail if a tool is missing
  -h, --help         this text

Needs root (or the tools already installed). Installs redis-server and
postgresql with apt-get if missing. Wall time is about 2*S + 5 s (plus
any install). Progress goes to stderr; the table (and "--json -") to stdout.
EOF
}

log()  { printf '[compare] %s\n' "$*" >&2; }
die()  { log "error: $*"; exit 1; }

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --clients)    CLIENTS="${2:?--clients needs a value}"; shift 2 ;;
            --seconds)    DURATION="${2:?--seconds needs a value}"; shift 2 ;;
            --json)       JSON_OUT="${2:?--json needs a path}"; shift 2 ;;
            --surge-json) SURGE_JSONS+=("${2:?--surge-json needs a path}"); shift 2 ;;
            --dir)        BASE_DIR="${2:?--dir needs a path}"; shift 2 ;;
            --no-install) ALLOW_INSTALL=0; shift ;;
            -h|--help)    usage; exit 0 ;;
            *)            usage >&2; die "unknown argument: $1" ;;
        esac
    done
    [[ "$CLIENTS" =~ ^[1-9][0-9]*$ ]]  || die "--clients must be a positive integer"
    [[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || die "--seconds must be a positive integer"
    [ -d "$BASE_DIR" ] || die "--dir: no such directory: $BASE_DIR"
    local f
    for f in "${SURGE_JSONS[@]}"; do
        [ -r "$f" ] || die "--surge-json: cannot read $f"
    done
}

# now: wall-clock seconds with sub-second precision, for elapsed times.
now() { date +%s.%N; }

# calc EXPR: floating-point arithmetic (bash has integers only).
calc() { awk "BEGIN { print $1 }"; }

# cpu_busy_pct: share of all CPU time in use, by anything, over one second.
# (Load average is no good here: it counts processes blocked on fsync,
# including a previous run's 64 PostgreSQL backends.)
cpu_busy_pct() {
    local a b
    a=$(head -n 1 /proc/stat); sleep 1; b=$(head -n 1 /proc/stat)
    # fields: cpu user nice system idle iowait irq softirq steal ...
    awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x); split(b, y)
        for (i = 2; i <= 9; i++) tot += y[i] - x[i]
        idle = (y[5] - x[5]) + (y[6] - x[6])
        printf "%.0f", (tot > 0 ? 100 * (1 - idle / tot) : 0) }'
}

# fsync_probe_ms: mean time of a 4 KiB append with O_DSYNC (write +
# fdatasync) in the servers' directory. Both workloads are bound by it:
# Redis fsyncs its AOF once per event-loop pass before replying, and
# PostgreSQL flushes WAL at each commit while holding the hot row's lock,
# so the hot-row rate is about 1 / (this + CPU time). On shared machines it
# swings several-fold within minutes, hence measured next to each run.
fsync_probe_ms() {
    local f="$WORKDIR/fsync-probe" secs
    secs=$(LC_ALL=C dd if=/dev/zero of="$f" bs=4k count=200 oflag=dsync 2>&1 \
           | sed -n 's/.*copied, \([0-9.e+-]*\) s,.*/\1/p')
    rm -f "$f"
    [ -n "$secs" ] || { echo null; return; }
    calc "$secs * 1000 / 200"
}

# ------------------------------------------------------------ installation --

apt_install() {
    [ "$ALLOW_INSTALL" = 1 ] || die "missing: $* (and --no-install given)"
    [ "$(id -u)" = 0 ]       || die "missing: $*; run as root so apt-get can install them"
    local aptlog
    aptlog=$(mktemp)
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >"$aptlog" 2>&1 || { cat "$aptlog" >&2; die "apt-get update failed"; }
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    # A policy-rc.d may refuse to start the packaged services (containers);
    # where it does not, they start on their default ports (6379, 5432).
    # Either way we never use them: we run our own instances on free ports.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$aptlog" 2>&1 \
        || { tail -n 30 "$aptlog" >&2; die "apt-get install failed"; }
    rm -f "$aptlog"
}

# find_pg_bin: newest /usr/lib/postgresql/<ver>/bin holding the server tools.
# Debian keeps initdb/pg_ctl/postgres out of $PATH, hence the lookup.
find_pg_bin() {
    local d best=""
    # sort -V so that 16 beats 9; keep the last (newest) complete one
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V); do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/pgbench" ] \
            && [ -x "$d/psql" ] && best="$d"
    done
    printf '%s' "$best"
}

ensure_tools() {
    local missing=()
    command -v redis-server    >/dev/null || missing+=(redis-server)
    # redis-benchmark and redis-cli come from redis-tools, a dependency of
    # redis-server; name it explicitly in case only the server is present.
    if ! command -v redis-benchmark >/dev/null || ! command -v redis-cli >/dev/null; then
        missing+=(redis-tools)
    fi
    # pgbench ships in the server package (postgresql-NN), not the client one.
    [ -n "$(find_pg_bin)" ] || missing+=(postgresql)
    command -v timeout >/dev/null || missing+=(coreutils)
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

    PG_BIN=$(find_pg_bin)
    [ -n "$PG_BIN" ] || die "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin"
    if [ "${#SURGE_JSONS[@]}" -gt 0 ] && ! command -v python3 >/dev/null && ! command -v jq >/dev/null; then
        apt_install jq
    fi
    REDIS_VERSION=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
    PG_VERSION=$("$PG_BIN/postgres" --version | awk '{ print $3 }')
    log "redis $REDIS_VERSION, postgres $PG_VERSION ($PG_BIN)"
}

# --------------------------------------------------------------- lifecycle --

cleanup() {
    local rc=$?
    set +e
    if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
        # NOSAVE: the data is throwaway; don't spend time rewriting it.
        timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1
        wait_until 5 gone "$REDIS_PID" || kill -9 "$REDIS_PID" 2>/dev/null
    fi
    if [ "$PG_STARTED" = 1 ]; then
        # immediate: no checkpoint needed, the cluster is deleted next.
        (cd / && timeout 30 "${PG_RUNAS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" \
            -m immediate -w -t 20 stop >/dev/null 2>&1)
        if [ -f "$PG_DATA/postmaster.pid" ]; then
            kill -9 "$(head -n 1 "$PG_DATA/postmaster.pid")" 2>/dev/null
        fi
    fi
    [ -n "$WORKDIR" ] && rm -rf "$WORKDIR"
    exit "$rc"
}

# free_port: a TCP port on 127.0.0.1 nobody listens on right now. Racy in
# theory; the server then fails to bind and we stop with an error.
free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$(( 20000 + RANDOM % 20000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    die "no free port found"
}

gone() { ! kill -0 "$1" 2>/dev/null; }

# wait_until SECONDS CMD...: poll CMD until it succeeds, or fail.
wait_until() {
    local limit=$1; shift
    local deadline=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# ------------------------------------------------------------------ redis --

rcli() { timeout 10 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

start_redis() {
    local dir="$WORKDIR/redis"
    mkdir -p "$dir"
    REDIS_PORT=$(free_port)
    # --save "": no RDB snapshots competing for the disk during the run;
    # durability comes from the AOF, fsynced before replies are sent
    # (Redis fsyncs once per event-loop iteration, i.e. group commit).
    # --daemonize: Redis detaches into its own session, so a Ctrl-C aimed
    # at this script does not also shut it down mid-run; cleanup() does.
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode yes \
        --dir "$dir" --appendonly yes --appendfsync always --save "" \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    wait_until 15 rcli ping || { tail -n 20 "$dir/redis.log" >&2; die "redis did not start"; }
    REDIS_PID=$(cat "$dir/redis.pid")
    [ "$(rcli config get appendfsync | tail -n 1)" = always ] || die "appendfsync is not 'always'"
    log "redis on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID), appendonly yes, appendfsync always"
}

stop_redis() {
    rcli shutdown nosave >/dev/null 2>&1 || true
    wait_until 10 gone "$REDIS_PID" || kill -9 "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=""
}

# (timeout --foreground, here and for pgbench: plain timeout moves the
# client into its own process group, where a Ctrl-C never reaches it and
# bash then ignores the Ctrl-C too.)
#
# redis_bench N SHA: one redis-benchmark run of N EVALSHA calls; prints its
# CSV result line: "cmd","rps","avg","min","p50","p95","p99","max".
# --csv rather than -q: -q streams a progress line per second, --csv prints
# only the summary. No -P: pipelining would not be "64 clients" any more.
redis_bench() {
    local n=$1 sha=$2
    timeout --foreground $(( DURATION + 60 )) \
        redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CLIENTS" -n "$n" --csv \
        evalsha "$sha" 1 stock | tail -n 1
}

# redis_warmup SHA: run until one run lasts >= 0.5 s; prints its rate.
# Warms up (connections, AOF file, page cache) and gives a first rate
# estimate for sizing the measured chunks.
redis_warmup() {
    local sha=$1 n=$(( CLIENTS * 50 )) line t0 t1
    for _ in 1 2 3 4 5 6; do
        t0=$(now)
        line=$(redis_bench "$n" "$sha")
        t1=$(now)
        awk -v a="$t0" -v b="$t1" 'BEGIN { exit !(b - a >= 0.5) }' && break
        n=$(( n * 4 ))
    done
    csv_field "$line" 2
}

run_redis() {
    local sha rate n before after line t_end left chunks="" rps p50 p99
    start_redis
    rcli set stock "$INITIAL_STOCK" >/dev/null
    sha=$(rcli script load "$REDIS_LUA")
    [[ "$sha" =~ ^[0-9a-f]{40}$ ]] || die "SCRIPT LOAD failed: $sha"
    # Sanity: the script does decrement.
    [ "$(rcli evalsha "$sha" 1 stock)" = $(( INITIAL_STOCK - 1 )) ] || die "Lua script misbehaves"

    rate=$(redis_warmup "$sha")
    log "redis: warm-up at ${rate} ops/s; measuring for ${DURATION}s"

    # redis-benchmark has no duration option, only a request count (-n),
    # and prints nothing when interrupted. A single run sized from a
    # calibration overshoots or undershoots badly here, because the rate
    # follows the disk's fsync latency, which swings several-fold on these
    # shared machines. So: back-to-back runs of ~2 s each, each sized from
    # the previous one's rate, until DURATION seconds have passed; the
    # result is total requests / total time as redis-benchmark measured it.
    before=$(rcli get stock)
    t_end=$(awk -v t="$(now)" -v d="$DURATION" 'BEGIN { printf "%.3f", t + d }')
    while left=$(awk -v e="$t_end" -v t="$(now)" 'BEGIN { printf "%.3f", e - t }') \
          && awk -v l="$left" 'BEGIN { exit !(l > 0.05) }'; do
        n=$(awk -v r="$rate" -v l="$left" -v c="$CLIENTS" \
            'BEGIN { t = (l < 2 ? l : 2); n = int(r * t); if (n < c * 4) n = c * 4; print n }')
        line=$(redis_bench "$n" "$sha")
        rate=$(csv_field "$line" 2)
        p50=$(csv_field "$line" 5)
        p99=$(csv_field "$line" 7)
        chunks+="$n $rate $p50 $p99"$'\n'    # one record per run
    done
    after=$(rcli get stock)

    # redis-benchmark counts error replies (e.g. NOSCRIPT) as requests too,
    # so check that every request really decremented the counter.
    REDIS_N=$(printf '%s' "$chunks" | awk '{ s += $1 } END { print s }')
    [ $(( before - after )) -eq "$REDIS_N" ] \
        || die "redis: stock fell by $(( before - after )), expected $REDIS_N (errors during run?)"
    [ "$after" -gt 0 ] || die "redis: stock reached zero; raise INITIAL_STOCK"

    # ops/s = sum(n) / sum(n / rps). p50: request-weighted mean of the runs'
    # p50s; p99: the worst run's p99 (percentiles don't add up exactly).
    read -r REDIS_OPS REDIS_P50 REDIS_P99 REDIS_RUNS <<<"$(printf '%s' "$chunks" | awk '
        { n += $1; t += $1 / $2; p50 += $1 * $3; if ($4 > p99) p99 = $4; k++ }
        END { printf "%.1f %.3f %.3f %d\n", n / t, p50 / n, p99, k }')"
    rps=$(printf '%s' "$chunks" | awk '{ printf "%s%.0f", (NR > 1 ? " " : ""), $2 }')
    log "redis: $REDIS_OPS ops/s, $REDIS_N requests in $REDIS_RUNS runs" \
        "(per-run ops/s: $rps; p50 ${REDIS_P50} ms, p99 ${REDIS_P99} ms)"
    stop_redis
}

# csv_field LINE K: K-th field of a redis-benchmark CSV line (quoted values).
csv_field() {
    local v
    v=$(printf '%s\n' "$1" | awk -F'","' -v k="$2" '{ gsub(/^"|"$/, ""); print $k }')
    [[ "$v" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "redis-benchmark: cannot parse output: $1"
    printf '%s' "$v"
}

# ------------------------------------------------------------- postgresql --

PG_USER=bench   # the cluster's superuser role (not an OS user)

pg_server() {   # run a server-side binary as the cluster owner, from a dir it can read
    (cd "$WORKDIR/pg" && "${PG_RUNAS[@]}" "$@")
}

pg_sql() {
    timeout 30 "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -c "$1"
}

start_postgres() {
    local dir="$WORKDIR/pg"
    mkdir -p "$dir"
    PG_DATA="$dir/data"
    # PostgreSQL refuses to run as root: as root, run it as the `postgres`
    # OS user (created by the Debian package); otherwise as ourselves.
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' OS user to run the server as"
        PG_RUNAS=(runuser -u postgres --)
        chmod 711 "$WORKDIR"          # let postgres reach its directory
        chown postgres: "$dir"
    else
        PG_RUNAS=()
    fi
    PG_PORT=$(free_port)

    # --no-sync: durability of initdb's own files is irrelevant here; the
    # server itself runs with fsync=on. trust auth: loopback-only, throwaway.
    pg_server "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" --auth=trust \
        -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; die "initdb failed"; }

    # fsync=on and synchronous_commit left at its default (on): every COMMIT
    # waits for its WAL flush, as every Redis reply waits for its AOF fsync.
    # max_connections: the default 100 is too few for large --clients.
    pg_server "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$dir/server.log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$dir -c fsync=on -c max_connections=$(( CLIENTS + 10 ))" \
        start >/dev/null \
        || { tail -n 20 "$dir/server.log" >&2; die "postgres did not start"; }
    PG_STARTED=1
    log "postgres on 127.0.0.1:$PG_PORT, fsync=$(pg_sql 'SHOW fsync')," \
        "synchronous_commit=$(pg_sql 'SHOW synchronous_commit')"
}

stop_postgres() {
    pg_server "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1 || true
    PG_STARTED=0
}

run_postgres() {
    local script="$WORKDIR/pg/hot_sku.sql" out before after jobs processed
    start_postgres
    pg_sql "CREATE TABLE stock (sku int PRIMARY KEY, qty bigint NOT NULL);
            INSERT INTO stock VALUES (1, $INITIAL_STOCK);"
    printf '%s\n' "$PG_SQL" >"$script"
    chmod 644 "$script"

    jobs=$(( CLIENTS < 2 ? CLIENTS : 2 ))   # pgbench: -j may not exceed -c
    before=$(pg_sql 'SELECT qty FROM stock WHERE sku = 1')
    # -n: no VACUUM of pgbench's own tables (we have none).
    out=$(timeout --foreground $(( DURATION + 60 )) "$PG_BIN/pgbench" -n \
            -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" \
            -c "$CLIENTS" -j "$jobs" -T "$DURATION" -f "$script" postgres 2>&1) \
        || { printf '%s\n' "$out" >&2; die "pgbench failed"; }
    after=$(pg_sql 'SELECT qty FROM stock WHERE sku = 1')

    # PG 14+ prints one "tps = X (without initial connection time)" line;
    # older versions print an "including connections establishing" one too.
    PG_TPS=$(printf '%s\n' "$out" | awk '/^tps = .*without initial connection/ { print $3; exit }
                                       /^tps = .*excluding connections/     { print $3; exit }')
    processed=$(printf '%s\n' "$out" | awk -F': ' '/actually processed/ { print $2; exit }' | cut -d/ -f1)
    PG_LAT=$(printf '%s\n' "$out" | awk '/^latency average = / { print $4; exit }')
    [[ "$PG_TPS" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { printf '%s\n' "$out" >&2; die "cannot parse pgbench output"; }

    # Each transaction is exactly one UPDATE of the row (qty stays > 0).
    [ $(( before - after )) -eq "$processed" ] \
        || die "postgres: qty fell by $(( before - after )), pgbench says $processed transactions"
    PG_N=$processed
    log "postgres: $PG_TPS tx/s, $processed transactions (latency avg ${PG_LAT} ms)"
    stop_postgres
}

# ------------------------------------------------------------------ surge --

# read_surge FILE: prints "throughput p50 p99" from one surge bench summary.
read_surge() {
    local vals tps
    if command -v python3 >/dev/null; then
        vals=$(python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(*(json.dumps(d.get(k)) for k in ("throughput_per_s", "p50_ms", "p99_ms")))
PY
        )
    else
        vals=$(jq -r '"\(.throughput_per_s // "null") \(.p50_ms // "null") \(.p99_ms // "null")"' "$1")
    fi
    read -r tps _ <<<"$vals"
    [[ "$tps" =~ ^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]] || die "$1: no numeric throughput_per_s"
    printf '%s\n' "$vals"
}

# ----------------------------------------------------------------- report --

report() {
    printf '\nHot-SKU comparison: %d clients, %d s each, %s cores, CPU %s%% busy before start\n' \
        "$CLIENTS" "$DURATION" "$(nproc)" "$CPU_BUSY_AT_START"
    printf '4 KiB write+fdatasync: %s ms before redis, %s ms before postgres\n\n' \
        "$FSYNC_MS_REDIS" "$FSYNC_MS_PG"
    printf '%-44s %14s %10s %10s\n' "system" "ops/s" "p50 ms" "p99 ms"
    printf '%-44s %14s %10s %10s\n' "--------------------------------------------" \
        "--------------" "----------" "----------"
    printf '%-44s %14.0f %10s %10s\n' "redis Lua EVALSHA, appendfsync always" \
        "$REDIS_OPS" "$REDIS_P50" "$REDIS_P99"
    printf '%-44s %14.0f %10s %10s\n' "postgres UPDATE one row, fsync on" \
        "$PG_TPS" "(avg $PG_LAT)" "-"
    local f tps p50 p99
    for f in "${SURGE_JSONS[@]}"; do
        read -r tps p50 p99 <<<"$(read_surge "$f")"
        printf '%-44s %14.0f %10s %10s   %.3f x redis, %.1f x postgres\n' "surge (from $(basename "$f"))" \
            "$tps" "$p50" "$p99" "$(calc "$tps / $REDIS_OPS")" "$(calc "$tps / $PG_TPS")"
    done
    printf '\n'
}

write_json() {
    local extra="" f tps p50 p99 runs=()
    for f in "${SURGE_JSONS[@]}"; do
        read -r tps p50 p99 <<<"$(read_surge "$f")"
        runs+=("$(printf '{"file": "%s", "throughput_per_s": %s, "p50_ms": %s, "p99_ms": %s, "over_redis": %s, "over_postgres": %s}' \
            "$f" "$tps" "$p50" "$p99" "$(calc "$tps / $REDIS_OPS")" "$(calc "$tps / $PG_TPS")")")
    done
    if [ "${#runs[@]}" -gt 0 ]; then
        extra=$(printf ',\n  "surge": [%s]' "$(IFS=,; echo "${runs[*]}")")
    fi
    local body
    body=$(cat <<EOF
{
  "redis_lua_fsync_ops_per_s": $REDIS_OPS,
  "redis_p50_ms": $REDIS_P50,
  "redis_p99_ms": $REDIS_P99,
  "redis_requests": $REDIS_N,
  "redis_benchmark_runs": $REDIS_RUNS,
  "postgres_update_tx_per_s": $PG_TPS,
  "postgres_latency_avg_ms": ${PG_LAT:-null},
  "postgres_transactions": $PG_N,
  "clients": $CLIENTS,
  "seconds": $DURATION,
  "redis_version": "$REDIS_VERSION",
  "postgres_version": "$PG_VERSION",
  "cpu_busy_pct_at_start": $CPU_BUSY_AT_START,
  "fdatasync_4k_ms_before_redis": $FSYNC_MS_REDIS,
  "fdatasync_4k_ms_before_postgres": $FSYNC_MS_PG$extra
}
EOF
)
    if [ "$JSON_OUT" = - ]; then
        printf '%s\n' "$body"
    else
        mkdir -p "$(dirname "$JSON_OUT")"
        printf '%s\n' "$body" >"$JSON_OUT"
        log "wrote $JSON_OUT"
    fi
}

# ------------------------------------------------------------------- main --

main() {
    parse_args "$@"
    ensure_tools
    local f
    for f in "${SURGE_JSONS[@]}"; do read_surge "$f" >/dev/null; done   # fail early on a bad file

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # Under a disk-backed directory, not /tmp: /tmp is a tmpfs on some
    # systems (Debian 13 by default), where fsync is free and both
    # "durable" figures would be meaningless.
    WORKDIR=$(mktemp -d -p "$BASE_DIR" surge-compare.XXXXXX)
    if [ "$(stat -f -c %T "$WORKDIR")" = tmpfs ]; then
        log "warning: $BASE_DIR is on tmpfs: fsync costs nothing there; use --dir"
    fi

    # The machines are shared: say how busy this one was, since a busy CPU
    # moves both reference figures (and Surge's) a lot.
    CPU_BUSY_AT_START=$(cpu_busy_pct)
    if [ "$CPU_BUSY_AT_START" -gt 25 ]; then
        log "warning: CPU ${CPU_BUSY_AT_START}% busy before starting; figures will be low and noisy"
    fi

    # One server at a time, so they don't compete for CPU or the disk.
    FSYNC_MS_REDIS=$(fsync_probe_ms)
    log "4 KiB O_DSYNC append: ${FSYNC_MS_REDIS} ms"
    run_redis
    FSYNC_MS_PG=$(fsync_probe_ms)
    log "4 KiB O_DSYNC append: ${FSYNC_MS_PG} ms"
    run_postgres

    report
    [ -z "$JSON_OUT" ] || write_json
}

main "$@"
