#!/usr/bin/env bash
# A shared MLflow tracking server on a local PostgreSQL cluster, both on 127.0.0.1.
#
#   scripts/team_server.sh start    # initdb on first use, start PostgreSQL + `mlflow server`
#   scripts/team_server.sh stop     # stop both
#   scripts/team_server.sh status
#
# Settings (environment):
#   TEAM_SERVER_DIR  where the cluster, artifacts, logs and pid files live (default .team-server)
#   MLFLOW_PORT      the tracking server's port (default 5000)
#   PG_PORT          PostgreSQL's port (default 5433, beside a system cluster on 5432)
#   MLFLOW_WORKERS   uvicorn workers of the tracking server (default 2)
#   PYTHON           the interpreter with mlflow and psycopg (default .venv/bin/python)
#
# PostgreSQL refuses to run as root: as root, the cluster is created and run as Debian's
# `postgres` user (runuser), so TEAM_SERVER_DIR's parents must be traversable by that user.
# The database password is generated once (TEAM_SERVER_DIR/pg_password, mode 600) and reaches
# `mlflow server` through MLFLOW_BACKEND_STORE_URI, never its command line.
set -euo pipefail

ACTION=${1:-start}
DIR=${TEAM_SERVER_DIR:-.team-server}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
PG_PORT=${PG_PORT:-5433}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
PYTHON=${PYTHON:-.venv/bin/python}
HOST=127.0.0.1
DB_USER=mlflow
DB_NAME=mlflow

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PGDATA="$DIR/pgdata"
URL="http://$HOST:$MLFLOW_PORT"

die() { echo "team_server: $*" >&2; exit 1; }

pg_bin() {
  # Debian keeps the server binaries in /usr/lib/postgresql/<version>/bin, off the PATH.
  if command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return
  fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$found" ] || die "PostgreSQL is not installed (Debian: apt-get install postgresql; 'make postgres' does that as root)"
  echo "$found"
}

as_pg() {  # run a PostgreSQL server binary, as `postgres` when we are root
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start_postgres() {
  local bin; bin=$(pg_bin)
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' user (Debian's postgresql package creates it)"
    chown postgres "$DIR"
    runuser -u postgres -- test -w "$DIR" \
      || die "the 'postgres' user cannot write $DIR (a parent folder is closed to it); set TEAM_SERVER_DIR elsewhere"
  fi
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    [ -f "$DIR/pg_password" ] \
      || (umask 077; "$PYTHON" -c "import secrets; print(secrets.token_urlsafe(24))" > "$DIR/pg_password")
    local pwfile="$DIR/.initdb_pw"
    (umask 077; cp "$DIR/pg_password" "$pwfile")
    [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
    as_pg "$bin/initdb" -D "$PGDATA" -U "$DB_USER" --pwfile="$pwfile" --auth=scram-sha-256 \
      -E UTF8 --no-locale >"$DIR/initdb.log" 2>&1 || { rm -f "$pwfile"; cat "$DIR/initdb.log" >&2; die "initdb failed"; }
    rm -f "$pwfile"
  fi
  if as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    echo "PostgreSQL already running ($PGDATA)"
  else
    # TCP on 127.0.0.1 only; no Unix socket (its default folder belongs to the system cluster).
    as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 \
      -o "-c listen_addresses=$HOST -p $PG_PORT -c unix_socket_directories=''" start >/dev/null \
      || { tail -20 "$PGDATA/server.log" >&2 || true; die "PostgreSQL did not start on port $PG_PORT"; }
  fi
  PGPASSWORD=$(cat "$DIR/pg_password") "$bin/psql" -h "$HOST" -p "$PG_PORT" -U "$DB_USER" -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1 \
    || PGPASSWORD=$(cat "$DIR/pg_password") "$bin/createdb" -h "$HOST" -p "$PG_PORT" -U "$DB_USER" "$DB_NAME"
}

healthy() {
  "$PYTHON" - "$URL/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.exit(0 if opener.open(sys.argv[1], timeout=2).status == 200 else 1)
EOF
}

start_mlflow() {
  if [ -f "$DIR/mlflow.pid" ] && kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null; then
    echo "mlflow server already running (pid $(cat "$DIR/mlflow.pid"))"
    return
  fi
  "$PYTHON" -c "import psycopg" 2>/dev/null || die "$PYTHON lacks psycopg (pip install -e '.[server]')"
  mkdir -p "$DIR/artifacts"
  # Own session (setsid): `stop` ends the server, its uvicorn workers and its job runner at once.
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://$DB_USER:$(cat "$DIR/pg_password")@$HOST:$PG_PORT/$DB_NAME" \
  MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true \
    setsid "$PYTHON" -m mlflow server --artifacts-destination "$DIR/artifacts" \
      --host "$HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
      >"$DIR/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$DIR/mlflow.pid"
  local waited=0
  until healthy; do
    kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null || { tail -30 "$DIR/mlflow.log" >&2; die "mlflow server exited"; }
    [ "$waited" -lt 180 ] || die "mlflow server did not answer $URL/health within 180 s (log: $DIR/mlflow.log)"
    sleep 1; waited=$((waited + 1))
  done
}

stop_all() {
  if [ -f "$DIR/mlflow.pid" ]; then
    local pid; pid=$(cat "$DIR/mlflow.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$DIR/mlflow.pid"
    echo "mlflow server stopped"
  fi
  if [ -f "$PGDATA/postmaster.pid" ]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null && echo "PostgreSQL stopped"
  fi
}

case "$ACTION" in
  start)
    start_postgres
    start_mlflow
    echo "MLflow tracking server: $URL  (PostgreSQL on $HOST:$PG_PORT, artifacts in $DIR/artifacts)"
    echo "use it:   export MLFLOW_TRACKING_URI=$URL"
    echo "stop it:  make server-stop   (or TEAM_SERVER_DIR=$DIR scripts/team_server.sh stop)"
    ;;
  stop) stop_all ;;
  status)
    if healthy; then echo "up: $URL"; else echo "down: $URL"; exit 1; fi ;;
  *) die "usage: $0 start|stop|status" ;;
esac
