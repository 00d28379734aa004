#!/usr/bin/env bash
# shellcheck disable=SC2317  # cleanup and its helpers run from the EXIT trap
# The README's run command: installs what is missing, builds the gateway, starts a
# demo upstream (nginx serving JSON on 127.0.0.1:3001 and :3002) and a demo
# PostgreSQL 15 (127.0.0.1:$DB_PORT, default 5433, database `app` loaded from
# demo/schema.sql, role `app` with password $DB_PASSWORD, default demo-secret) and
# a demo Redis (127.0.0.1:$REDIS_PORT, default 6380, nothing persisted) for the
# response cache, then runs the gateway on 127.0.0.1:8080 with demo/gateway.yaml until Ctrl-C (SIGINT) or
# SIGTERM, which stop them all. Everything it writes goes to .demo/ in the
# repository; the PostgreSQL cluster is made afresh on every run.
#
# Environment: DB_PORT, DB_PASSWORD, REDIS_PORT (also read by demo/gateway.yaml), GATEWAY_LISTEN
# (read by demo/gateway.yaml too), GATEWAY_BUILD_DIR (default build/), PG_BIN
# (default /usr/lib/postgresql/15/bin), DEMO_PG_USER (the user PostgreSQL runs as
# when this script runs as root; default postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build="${GATEWAY_BUILD_DIR:-$root/build}"

export DB_PORT="${DB_PORT:-5433}"
export DB_PASSWORD="${DB_PASSWORD:-demo-secret}"
export REDIS_PORT="${REDIS_PORT:-6380}"
pg_bin="${PG_BIN:-/usr/lib/postgresql/15/bin}"
gw_addr="${GATEWAY_LISTEN:-127.0.0.1:8080}"

scripts/install-deps.sh
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"$(nproc 2>/dev/null || echo 2)"

run="$root/.demo"
mkdir -p "$run/nginx/logs"

# ---- processes and their cleanup --------------------------------------------------------

nginx_pid=""
redis_pid=""
gw_pid=""
pg_data=""
pg_sock_tmp=""

say() { printf 'demo: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# A child still running (a zombie, exited but not reaped yet, is not).
alive() {
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ -n "$stat" && "$stat" != Z* ]]
}

# SIGTERM to child PID, up to SECS seconds for it to exit, then SIGKILL; reaped.
stop_pid() {
  local pid=$1 secs=$2 i
  [ -n "$pid" ] || return 0
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      say "pid $pid did not stop within ${secs}s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

# PostgreSQL refuses to run as root: as root, initdb and pg_ctl (so the postmaster)
# run as an unprivileged user, owner of the cluster's directory. Clients (psql, the
# gateway) stay who they are: root reaches the socket anyway, TCP needs no files.
pg_user=""
if [ "$(id -u)" = 0 ]; then
  pg_user="${DEMO_PG_USER:-postgres}"
  id -u "$pg_user" >/dev/null 2>&1 ||
    die "running as root and there is no user '$pg_user' to run PostgreSQL as (the postgresql package creates 'postgres'; or set DEMO_PG_USER)"
fi
as_pg() {
  if [ -n "$pg_user" ]; then runuser -u "$pg_user" -- "$@"; else "$@"; fi
}

# Stops the cluster in DATA: a fast shutdown, then an immediate one, then SIGKILL
# to the postmaster; every step bounded.
pg_stop() {
  local data=$1 pid
  [ -f "$data/postmaster.pid" ] || return 0
  as_pg "$pg_bin/pg_ctl" -D "$data" -m fast -w -t 20 stop >/dev/null 2>&1 ||
    as_pg "$pg_bin/pg_ctl" -D "$data" -m immediate -w -t 10 stop >/dev/null 2>&1 || {
    pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      say "PostgreSQL (pid $pid) did not stop: killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  }
}

# A process left running by an earlier run that was killed (SIGKILL skips the
# cleanup): PID from PIDFILE, stopped only when its command line holds PATTERN.
stop_stale() {
  local pidfile=$1 pattern=$2 pid cmd="" i
  pid=$(head -n 1 "$pidfile" 2>/dev/null || true)
  if [[ "$pid" =~ ^[0-9]+$ ]]; then cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true); fi
  if [[ -n "$cmd" && "$cmd" == *"$pattern"* ]]; then
    say "stopping pid $pid left running by an earlier run"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

cleanup() {
  set +e
  trap '' INT TERM
  stop_pid "$gw_pid" 10      # server.drain_timeout is 5s
  gw_pid=""
  rm -f "$run/gateway.pid"
  stop_pid "$nginx_pid" 5
  nginx_pid=""
  stop_pid "$redis_pid" 5
  redis_pid=""
  if [ -n "$pg_data" ]; then
    pg_stop "$pg_data"
    pg_data=""
  fi
  if [ -n "$pg_sock_tmp" ]; then rm -rf "$pg_sock_tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stop_stale "$run/gateway.pid" "$root/demo/gateway.yaml"
stop_stale "$run/nginx/nginx.pid" "$run/nginx/nginx.conf"

# ---- the demo upstream: nginx ------------------------------------------------------------

cat > "$run/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $run/nginx/nginx.pid;
error_log $run/nginx/logs/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  default_type application/json;
  server {
    listen 127.0.0.1:3001;
    listen 127.0.0.1:3002;
    location = /api/blueprints {
      if (\$request_method = GET) { return 200 '[{"id":1,"name":"web-tier"},{"id":2,"name":"data-tier"}]\n'; }
      return 201 '{"created":true,"served_by":\$server_port}\n';
    }
    location ~ ^/api/blueprints/(\d+)$ { return 200 '{"id":\$1,"name":"blueprint-\$1","served_by":\$server_port}\n'; }
    location / { return 200 '{"path":"\$uri","served_by":\$server_port}\n'; }
  }
}
NGINX

nginx -p "$run/nginx" -c "$run/nginx/nginx.conf" &
nginx_pid=$!

nginx_up=0
for _ in $(seq 1 50); do
  if curl -fs -o /dev/null http://127.0.0.1:3001/api/blueprints; then nginx_up=1; break; fi
  alive "$nginx_pid" || die "nginx exited (ports 3001/3002 taken?); see $run/nginx/logs/error.log"
  sleep 0.1
done
[ "$nginx_up" = 1 ] || say "nginx does not answer on 127.0.0.1:3001 yet; going on"

# ---- the demo cache store: Redis -----------------------------------------------------------

if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT" 2>/dev/null; then
  die "something already listens on 127.0.0.1:$REDIS_PORT; set REDIS_PORT to a free port"
fi
mkdir -p "$run/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
  --dir "$run/redis" --logfile "$run/redis/redis.log" --maxmemory 128mb --maxmemory-policy allkeys-lru &
redis_pid=$!
redis_up=0
for _ in $(seq 1 50); do
  if [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; then redis_up=1; break; fi
  alive "$redis_pid" || die "redis-server exited; see $run/redis/redis.log"
  sleep 0.1
done
[ "$redis_up" = 1 ] || say "Redis does not answer on 127.0.0.1:$REDIS_PORT yet; going on (the cache bypasses)"

# ---- the demo database: PostgreSQL -------------------------------------------------------

[ -x "$pg_bin/initdb" ] || die "no PostgreSQL in $pg_bin (install the postgresql package, or set PG_BIN)"

# The cluster lives in .demo/postgres, made afresh on every run. When the user
# PostgreSQL runs as cannot reach it (a repository in a private directory), it
# lives in a fixed directory under /tmp instead.
pg_dir="$run/postgres"
pg_prepare_dir() {
  # A cluster left running by an earlier run that was killed: stop it first.
  if [ -f "$1/data/postmaster.pid" ]; then
    say "stopping a PostgreSQL left running in $1/data"
    pg_stop "$1/data"
  fi
  rm -rf "$1"
  mkdir -p "$1"
  if [ -n "$pg_user" ]; then chown "$pg_user:" "$1"; fi
}
pg_prepare_dir "$pg_dir"
if ! as_pg test -w "$pg_dir" -a -x "$pg_dir"; then
  rmdir "$pg_dir"
  pg_dir="${TMPDIR:-/tmp}/gateway-demo-postgres"
  say "user $pg_user cannot reach $run; the cluster goes to $pg_dir"
  pg_prepare_dir "$pg_dir"
fi
data="$pg_dir/data"
log="$pg_dir/postgres.log"

# A Unix socket path is at most 107 bytes.
sock="$pg_dir"
if [ $((${#sock} + 20)) -gt 107 ]; then
  pg_sock_tmp=$(mktemp -d /tmp/gateway-demo-pgsock.XXXXXX)
  if [ -n "$pg_user" ]; then chown "$pg_user:" "$pg_sock_tmp"; fi
  sock="$pg_sock_tmp"
fi

if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$DB_PORT" 2>/dev/null; then
  die "something already listens on 127.0.0.1:$DB_PORT; set DB_PORT to a free port"
fi

pg_fail() {
  say "$1; the end of $2:"
  tail -n 30 "$2" >&2 2>/dev/null || true
  exit 1
}

say "PostgreSQL: initdb in $data"
as_pg timeout 120 "$pg_bin/initdb" -D "$data" -U postgres -E UTF8 --locale=C \
  --auth-local=trust --auth-host=scram-sha-256 >"$pg_dir/initdb.log" 2>&1 ||
  pg_fail "initdb failed" "$pg_dir/initdb.log"

# Trust on the Unix socket (only this machine's users who can reach the directory),
# a password (SCRAM) for the role app over TCP, nothing else.
cat > "$data/pg_hba.conf" <<HBA
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    app       app   127.0.0.1/32   scram-sha-256
HBA
cat >> "$data/postgresql.conf" <<CONF

# scripts/demo.sh
listen_addresses = '127.0.0.1'
port = $DB_PORT
unix_socket_directories = '$sock'
password_encryption = scram-sha-256
max_connections = 50
fsync = off                 # a throw-away cluster, made afresh on every run
CONF

pg_data="$data"   # from here on, cleanup stops it
say "PostgreSQL: starting on 127.0.0.1:$DB_PORT (log: $log)"
as_pg "$pg_bin/pg_ctl" -D "$data" -l "$log" -w -t 30 start >/dev/null ||
  pg_fail "PostgreSQL did not start within 30s" "$log"

pg_ready=0
for _ in $(seq 1 100); do
  if "$pg_bin/pg_isready" -q -t 2 -h 127.0.0.1 -p "$DB_PORT"; then pg_ready=1; break; fi
  sleep 0.1
done
[ "$pg_ready" = 1 ] || pg_fail "PostgreSQL does not accept connections on 127.0.0.1:$DB_PORT" "$log"

psql_local() {
  timeout 60 "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$DB_PORT" "$@"
}
# The password goes through a psql variable (:'pw' quotes it), never into the SQL text.
psql_local -U postgres -d postgres -v pw="$DB_PASSWORD" >/dev/null <<'SQL' || pg_fail "creating role and database app failed" "$log"
create role app login password :'pw';
create database app owner app;
SQL
psql_local -U app -d app -f "$root/demo/schema.sql" >/dev/null ||
  pg_fail "loading demo/schema.sql failed" "$log"
# The gateway's way in: TCP with the password.
projects=$(PGPASSWORD="$DB_PASSWORD" PGCONNECT_TIMEOUT=5 timeout 30 "$pg_bin/psql" -X -tA \
  -h 127.0.0.1 -p "$DB_PORT" -U app -d app -c 'select count(*) from projects') ||
  pg_fail "role app cannot log in over TCP with DB_PASSWORD" "$log"
say "PostgreSQL: database app ready, $projects projects"

# ---- the gateway -------------------------------------------------------------------------

# In the background, so that SIGTERM to this script is handled at once (bash runs
# traps only between foreground commands) and stops everything.
"$build/gateway" -c "$root/demo/gateway.yaml" &
gw_pid=$!
echo "$gw_pid" >"$run/gateway.pid"

gw_ready=0
for _ in $(seq 1 150); do
  alive "$gw_pid" || break
  if curl -fs -o /dev/null --max-time 2 "http://$gw_addr/ready"; then gw_ready=1; break; fi
  sleep 0.1
done
if ! alive "$gw_pid"; then
  rc=0
  wait "$gw_pid" || rc=$?
  gw_pid=""
  die "the gateway exited (status $rc) before it was ready"
fi
[ "$gw_ready" = 1 ] || say "the gateway does not answer /ready with 200 after 15s; going on"

cat <<MSG

Demo upstream (nginx) on 127.0.0.1:3001 and :3002, PostgreSQL on 127.0.0.1:$DB_PORT
(database app, user app, password \$DB_PASSWORD), Redis on 127.0.0.1:$REDIS_PORT, the
gateway on $gw_addr.
Try, from another terminal:
  curl -i http://$gw_addr/api/blueprints
  curl -i http://$gw_addr/api/blueprints/7
  curl -i -X POST -d '{"name":"x"}' http://$gw_addr/api/blueprints
The response cache (X-Cache: MISS, then HIT; a write invalidates):
  curl -si http://$gw_addr/api/blueprints | grep -iE '^(x-cache|age|cache-status)'
  curl -si http://$gw_addr/api/blueprints | grep -iE '^(x-cache|age|cache-status)'
  curl -si -X POST -d '{}' http://$gw_addr/api/blueprints >/dev/null
  curl -si 'http://$gw_addr/api/blueprints/7?cache=false' | grep -i '^x-cache'   # BYPASS
  curl -s -X POST -H "Authorization: Bearer ${GATEWAY_ADMIN_TOKEN:-demo-token}" 'http://127.0.0.1:9901/admin/cache/invalidate?pattern=cache:project:*'
  redis-cli -p $REDIS_PORT --scan --pattern 'cache:*'
SQL routes (demo/gateway.yaml, data from demo/schema.sql):
  curl -i http://$gw_addr/api/projects/1                  # one row as an object
  curl -i 'http://$gw_addr/api/projects?limit=5&offset=10' # a page: Content-Range, Link
  curl -i http://$gw_addr/api/projects/999                # 404: no such row
  curl -i http://$gw_addr/api/projects/abc                # 400: the database rejects the parameter
  curl -s 'http://$gw_addr/api/projects/search?q=falcon'
  curl -s http://$gw_addr/api/projects/3/tasks
  curl -s http://$gw_addr/api/owners
  curl -s http://$gw_addr/api/owners/carol/projects
  curl -s -H 'X-User: bob' http://$gw_addr/api/me/projects
  curl -s http://$gw_addr/api/stats
Operations:
  curl -s http://$gw_addr/metrics | grep -E 'http_requests_total|gateway_pool|gateway_cache|redis'
  curl -s http://$gw_addr/ready
  curl -s -H "Authorization: Bearer ${GATEWAY_ADMIN_TOKEN:-demo-token}" http://127.0.0.1:9901/admin/pools
  curl -s -X POST -H "Authorization: Bearer ${GATEWAY_ADMIN_TOKEN:-demo-token}" http://127.0.0.1:9901/admin/reload
  PGPASSWORD=\$DB_PASSWORD psql -h 127.0.0.1 -p $DB_PORT -U app app
Ctrl-C stops it all.

MSG

rc=0
wait "$gw_pid" || rc=$?
gw_pid=""
exit "$rc"
