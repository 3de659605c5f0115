#!/usr/bin/env bash
# Throw-away PostgreSQL + Redis servers for the "server mode" tests.
#
#   tests/services.sh install             install postgresql / redis-server (and docker-compose, to
#                                         validate docker-compose.yml) via apt if missing
#   tests/services.sh start DIR           start both on free 127.0.0.1 ports, state in DIR
#   tests/services.sh stop DIR            stop both (by PID), leave DIR for the caller to delete
#   tests/services.sh restart-postgres DIR
#   tests/services.sh stop-postgres DIR | start-postgres DIR    (same port as before)
#   tests/services.sh stop-redis DIR    | start-redis DIR       (same port as before)
#
# After `start`, DIR/env holds KEY=VALUE lines:
#   NDS_TEST_DATABASE_URL, NDS_TEST_MIGRATIONS_DATABASE_URL, NDS_TEST_BROKER_URL,
#   NDS_TEST_PG_PORT, NDS_TEST_REDIS_PORT
# and DIR/postgres.pid, DIR/redis.pid hold the server PIDs.
#
# Never touches the Debian-managed clusters/services: our instances use their
# own data directory, socket directory and ports.
#
# Running as root: PostgreSQL refuses to run as root, so it runs as the
# `postgres` user via runuser. If that user cannot reach DIR (e.g. pytest's
# /tmp/pytest-of-root is mode 0700) the PostgreSQL files live in a private
# directory under ${TMPDIR:-/tmp} (DIR/pg is a symlink to it) which `stop`
# removes once PostgreSQL has exited.
set -euo pipefail

WAIT_SECONDS="${NDS_SERVICES_TIMEOUT:-20}"

die() { echo "services.sh: error: $*" >&2; exit 1; }
log() { echo "services.sh: $*" >&2; }

is_root() { [ "$(id -u)" = 0 ]; }

# ----------------------------------------------------------------- discovery
pg_bindir() {
    if [ -n "${NDS_PG_BINDIR:-}" ]; then  # explicit override
        [ -x "$NDS_PG_BINDIR/postgres" ] || return 1
        echo "$NDS_PG_BINDIR"; return 0
    fi
    local d
    # newest version first
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && [ -x "$d/pg_ctl" ] \
            && [ -x "$d/psql" ] && [ -x "$d/pg_isready" ]; then
            echo "$d"; return 0
        fi
    done
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        d="$(dirname "$(command -v pg_ctl)")"
        if [ -x "$d/postgres" ] && [ -x "$d/psql" ] && [ -x "$d/pg_isready" ]; then
            echo "$d"; return 0
        fi
    fi
    return 1
}

redis_bin() {  # redis_bin redis-server|redis-cli
    if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return 0; fi
    if [ -x "/usr/bin/$1" ]; then echo "/usr/bin/$1"; return 0; fi
    return 1
}

# ------------------------------------------------------------------- install
missing_pkgs() {
    local pkgs=()
    pg_bindir >/dev/null || pkgs+=(postgresql)
    if ! redis_bin redis-server >/dev/null; then
        pkgs+=(redis-server)          # pulls in redis-tools (redis-cli)
    elif ! redis_bin redis-cli >/dev/null; then
        pkgs+=(redis-tools)
    fi
    # `docker compose config` validates docker-compose.yml without a Docker engine; Debian's
    # docker-compose gives the same check where the compose plugin is missing
    if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
        pkgs+=(docker-compose)
    fi
    echo "${pkgs[*]}"
}

cmd_install() {
    local pkgs=()
    read -r -a pkgs <<< "$(missing_pkgs)"
    [ "${#pkgs[@]}" -eq 0 ] && return 0
    # Serialise concurrent installs (parallel test sessions), then re-check.
    if command -v flock >/dev/null 2>&1 && exec 9>>"${TMPDIR:-/tmp}/nds-services-install.lock"; then
        flock -w 900 9 || die "timed out waiting for another 'services.sh install'"
        read -r -a pkgs <<< "$(missing_pkgs)"
        [ "${#pkgs[@]}" -eq 0 ] && return 0
    fi

    local sudo=()
    if ! is_root; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null \
            || die "missing ${pkgs[*]} and not root (no passwordless sudo); install them: apt-get install ${pkgs[*]}"
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing ${pkgs[*]} and apt-get is not available"

    log "installing ${pkgs[*]} (apt-get) ..."
    # Keep the packages' maintainer scripts from starting the system-wide
    # postgresql/redis services (standard Debian policy-rc.d mechanism); we
    # never use them. Only if no policy is in place already.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        "${sudo[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy" && created_policy=1
    fi
    local rc=0
    (
        set -e
        "${sudo[@]}" apt-get update -qq
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            -o DPkg::Lock::Timeout=300 --no-install-recommends "${pkgs[@]}"
    ) >&2 || rc=$?
    if [ "$created_policy" = 1 ]; then "${sudo[@]}" rm -f "$policy"; fi
    [ "$rc" -eq 0 ] || die "apt-get install ${pkgs[*]} failed (exit $rc)"

    pg_bindir >/dev/null || die "postgresql installed but no initdb/postgres found under /usr/lib/postgresql/*/bin"
    redis_bin redis-server >/dev/null || die "redis-server still not found after install"
    redis_bin redis-cli >/dev/null || die "redis-cli still not found after install"
    log "installed ${pkgs[*]}"
}

# ------------------------------------------------------------------- helpers
free_ports() {  # prints two distinct free loopback ports
    python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

env_get() {  # env_get DIR KEY
    local v
    v="$(sed -n "s/^$2=//p" "$1/env" 2>/dev/null | tail -n1)"
    [ -n "$v" ] || die "$2 not found in $1/env (was 'start' run?)"
    echo "$v"
}

# Alive = exists and is not a zombie (exited daemons are reparented to PID 1,
# which may reap them only after a while).
pid_alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0   # no /proc: trust kill -0
    stat="${stat##*) }"
    [ "${stat%% *}" != Z ]
}

wait_exit() {  # wait_exit PID SECONDS -> 0 if exited
    local pid="$1" deadline=$((SECONDS + $2))
    while pid_alive "$pid"; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.1
    done
    return 0
}

kill_and_wait() {  # kill_and_wait PID SIGNAL
    local pid="$1"
    pid_alive "$pid" || return 0
    kill "-$2" "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" "$WAIT_SECONDS"; then
        log "PID $pid did not exit after SIG$2, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_exit "$pid" 5 || die "PID $pid did not die"
    fi
}

# Run a command as the PostgreSQL server user (postgres when we are root).
as_pg() {
    if is_root; then
        (cd "$PGROOT" && runuser -u postgres -- "$@")
    else
        (cd "$PGROOT" && "$@")
    fi
}

# Sets PGROOT (dir holding data/, sock/, postgres.log) for an existing DIR.
load_pgroot() {
    local dir="$1"
    if [ -L "$dir/pg" ] || [ -d "$dir/pg" ]; then
        PGROOT="$(readlink -f "$dir/pg")"
    else
        PGROOT=""
    fi
}

# --------------------------------------------------------------- postgres
pg_start_server() {  # pg_start_server DIR ; uses PGROOT
    local dir="$1" bindir
    bindir="$(pg_bindir)" || die "PostgreSQL not installed (run: $0 install)"
    rm -f "$dir/postgres.pid"
    if ! as_pg "$bindir/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/postgres.log" \
            -w -t "$WAIT_SECONDS" -s start >/dev/null; then
        tail -n 30 "$PGROOT/postgres.log" >&2 2>/dev/null || true
        die "PostgreSQL did not start within ${WAIT_SECONDS}s (log: $PGROOT/postgres.log)"
    fi
    local pid
    pid="$(head -n1 "$PGROOT/data/postmaster.pid" 2>/dev/null || true)"
    pid_alive "$pid" || die "PostgreSQL started but no live PID in $PGROOT/data/postmaster.pid"
    echo "$pid" > "$dir/postgres.pid"
    local port deadline=$((SECONDS + WAIT_SECONDS))
    port="$(env_get "$dir" NDS_TEST_PG_PORT 2>/dev/null || sed -n 's/^port = //p' "$PGROOT/data/postgresql.conf" | tail -n1)"
    until "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -t 1; do
        [ "$SECONDS" -ge "$deadline" ] && die "PostgreSQL not answering on 127.0.0.1:$port after ${WAIT_SECONDS}s"
        sleep 0.1
    done
}

pg_stop_server() {  # pg_stop_server DIR
    local dir="$1" pid="" bindir
    load_pgroot "$dir"
    [ -f "$dir/postgres.pid" ] && pid="$(cat "$dir/postgres.pid")"
    if [ -n "$PGROOT" ] && [ -f "$PGROOT/data/postmaster.pid" ]; then
        [ -n "$pid" ] || pid="$(head -n1 "$PGROOT/data/postmaster.pid")"
        if bindir="$(pg_bindir)"; then
            as_pg "$bindir/pg_ctl" -D "$PGROOT/data" -m fast -w -t "$WAIT_SECONDS" -s stop \
                >/dev/null 2>&1 || true
        fi
    fi
    # fallback (and confirmation): SIGINT = fast shutdown
    if [ -n "$pid" ]; then kill_and_wait "$pid" INT; fi
    rm -f "$dir/postgres.pid"
}

cmd_start_postgres_initial() {  # DIR PGPORT
    local dir="$1" port="$2" bindir
    bindir="$(pg_bindir)" || die "PostgreSQL not installed (run: $0 install)"

    # Where the postgres-owned files go.
    local in_dir=1
    if is_root; then
        id postgres >/dev/null 2>&1 || die "user 'postgres' does not exist"
        runuser -u postgres -- test -x "$dir" 2>/dev/null || in_dir=0
        # unix socket paths are limited to ~107 bytes
        [ "${#dir}" -le 70 ] || in_dir=0
    else
        [ "${#dir}" -le 70 ] || in_dir=0
    fi
    if [ "$in_dir" = 1 ]; then
        PGROOT="$dir/pg"
        mkdir -p "$PGROOT"
    else
        PGROOT="$(mktemp -d "${TMPDIR:-/tmp}/nds-pg.XXXXXX")"
        ln -sfn "$PGROOT" "$dir/pg"
    fi
    mkdir -p "$PGROOT/sock"
    chmod 700 "$PGROOT"
    if is_root; then chown -R postgres: "$PGROOT"; fi

    as_pg "$bindir/initdb" -D "$PGROOT/data" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 --no-sync --no-instructions \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }

    cat >> "$PGROOT/data/postgresql.conf" <<EOF

# --- nds test instance (tests/services.sh) ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PGROOT/sock'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 64MB
EOF

    pg_start_server "$dir"

    PGCONNECT_TIMEOUT=5 "$bindir/psql" -X -q -v ON_ERROR_STOP=1 \
        -h "$PGROOT/sock" -p "$port" -U postgres -d postgres \
        -c "CREATE ROLE nds LOGIN CREATEDB PASSWORD 'nds'" \
        -c "CREATE DATABASE nds OWNER nds" \
        -c "CREATE DATABASE nds_migrations OWNER nds" \
        >/dev/null || die "creating role/databases failed"
}

# ------------------------------------------------------------------ redis
redis_start_server() {  # DIR PORT
    local dir="$1" port="$2" srv cli
    srv="$(redis_bin redis-server)" || die "redis-server not installed (run: $0 install)"
    cli="$(redis_bin redis-cli)" || die "redis-cli not installed (run: $0 install)"
    rm -f "$dir/redis.pid"
    "$srv" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --daemonize yes --pidfile "$dir/redis.pid" --dir "$dir" \
        --logfile "$dir/redis.log" --protected-mode yes \
        || die "redis-server failed to start (log: $dir/redis.log)"
    local deadline=$((SECONDS + WAIT_SECONDS))
    until [ -s "$dir/redis.pid" ] && [ "$("$cli" -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$dir/redis.log" >&2 2>/dev/null || true
            die "Redis not answering on 127.0.0.1:$port after ${WAIT_SECONDS}s (log: $dir/redis.log)"
        fi
        sleep 0.05
    done
}

redis_stop_server() {  # DIR
    local dir="$1" pid="" port cli
    [ -f "$dir/redis.pid" ] && pid="$(cat "$dir/redis.pid")"
    if pid_alive "$pid"; then
        # SHUTDOWN NOSAVE is immediate; SIGTERM is only acted on at the next
        # server cron tick. Fall back to the signal.
        if port="$(env_get "$dir" NDS_TEST_REDIS_PORT 2>/dev/null)" && cli="$(redis_bin redis-cli)"; then
            timeout 5 "$cli" -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
        fi
        kill_and_wait "$pid" TERM
    fi
    rm -f "$dir/redis.pid"
}

# ---------------------------------------------------------------- commands
cmd_start() {
    local dir="$1"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd -P)"
    [ -f "$dir/env" ] && die "$dir/env exists: services already started in $dir (stop them first)"
    redis_bin redis-server >/dev/null && redis_bin redis-cli >/dev/null && pg_bindir >/dev/null \
        || die "PostgreSQL/Redis not installed (run: $0 install)"

    local pgport rport
    read -r pgport rport < <(free_ports)
    # write env first (ports), so that stop/restart can find everything even
    # if a later step fails
    cat > "$dir/env.tmp" <<EOF
NDS_TEST_DATABASE_URL=postgresql+psycopg://nds:nds@127.0.0.1:$pgport/nds
NDS_TEST_MIGRATIONS_DATABASE_URL=postgresql+psycopg://nds:nds@127.0.0.1:$pgport/nds_migrations
NDS_TEST_BROKER_URL=redis://127.0.0.1:$rport/0
NDS_TEST_PG_PORT=$pgport
NDS_TEST_REDIS_PORT=$rport
EOF
    mv "$dir/env.tmp" "$dir/env"

    # Start redis first (fast), postgres afterwards; on failure clean up.
    trap 'rc=$?; [ $rc -ne 0 ] && { log "start failed, stopping what was started"; cmd_stop "$dir" || true; }; exit $rc' EXIT
    redis_start_server "$dir" "$rport"
    cmd_start_postgres_initial "$dir" "$pgport"
    trap - EXIT
}

cmd_stop() {
    local dir="$1" rc=0
    [ -d "$dir" ] || return 0
    dir="$(cd "$dir" && pwd -P)"
    (redis_stop_server "$dir") || rc=1
    (pg_stop_server "$dir") || rc=1
    # PostgreSQL files outside DIR (root case) are ours alone: remove them.
    if [ -L "$dir/pg" ]; then
        local target
        target="$(readlink "$dir/pg")"
        if [ "$rc" = 0 ] && [[ "$(basename "$target")" == nds-pg.* ]]; then
            cp "$target/postgres.log" "$dir/postgres.log" 2>/dev/null || true
            rm -rf -- "$target"
            rm -f "$dir/pg"
        fi
    fi
    return "$rc"
}

need_dir() {
    [ -n "${1:-}" ] || die "usage: $0 $CMD DIR"
    [ -f "$1/env" ] || die "$1/env not found (was 'start' run?)"
}

CMD="${1:-}"
case "$CMD" in
    install)
        cmd_install ;;
    start)
        [ -n "${2:-}" ] || die "usage: $0 start DIR"
        cmd_start "$2" ;;
    stop)
        [ -n "${2:-}" ] || die "usage: $0 stop DIR"
        cmd_stop "$2" ;;
    restart-postgres)
        need_dir "${2:-}"
        pg_stop_server "$2"
        load_pgroot "$2"; pg_start_server "$2" ;;
    stop-postgres)
        need_dir "${2:-}"
        pg_stop_server "$2" ;;
    start-postgres)
        need_dir "${2:-}"
        load_pgroot "$2"
        pid_alive "$(cat "$2/postgres.pid" 2>/dev/null || true)" || pg_start_server "$2" ;;
    stop-redis)
        need_dir "${2:-}"
        redis_stop_server "$2" ;;
    start-redis)
        need_dir "${2:-}"
        pid_alive "$(cat "$2/redis.pid" 2>/dev/null || true)" \
            || redis_start_server "$2" "$(env_get "$2" NDS_TEST_REDIS_PORT)" ;;
    *)
        echo "usage: $0 {install|start DIR|stop DIR|restart-postgres DIR|stop-postgres DIR|start-postgres DIR|stop-redis DIR|start-redis DIR}" >&2
        exit 2 ;;
esac
