#!/usr/bin/env bash
# The wheel deploys with no checkout: build it, install it as the Dockerfile does (the lock with hashes,
# then the wheel without dependencies) into a fresh virtualenv outside the checkout, then run
# `vidgate migrate` on SQLite (the default path) and on PostgreSQL, and `vidgate serve` on each until
# /readyz answers 200 (the upstream is a `vidgate simulator` on loopback, as a vendor stand-in).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
PG=${VIDGATE_WHEEL_CHECK_PG:-postgresql://postgres@127.0.0.1:5432}
WORK=$(mktemp -d /tmp/vidgate-wheel.XXXXXX)
PGDB="vidgate_wheel_$$"
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $PGDB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() { echo "wheel-check: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() {  # url, seconds: until it answers 200
  python3 - "$1" "$2" <<'PY'
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                sys.exit(0)
    except OSError as exc:
        last = exc
    if time.monotonic() > deadline:
        sys.exit(f"{url} did not answer 200 in time: {last}")
    time.sleep(0.2)
PY
}

# Built from a copy of the files git would commit, so a stale build/ in the checkout cannot hide a missing file.
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src"
"$UV" build --quiet --wheel --out-dir "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/vidgate-*.whl)
echo "wheel-check: built $(basename "$WHEEL")"

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
"$WORK/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "$WHEEL"
"$WORK/venv/bin/pip" check --disable-pip-version-check >/dev/null || "$WORK/venv/bin/pip" check || fail "the lock does not satisfy the wheel's dependencies"

# From here on nothing may come from the checkout: another directory, a fresh HOME, no VIDGATE_* settings.
mkdir -p "$WORK/run" "$WORK/home"
cd "$WORK/run"
while IFS='=' read -r name _; do
  case $name in VIDGATE_* | VIBEDREAM_*) unset "$name" ;; esac
done < <(env)
unset PYTHONPATH XDG_DATA_HOME
export HOME="$WORK/home" VIDGATE_LOG_JSON=false
VIDGATE="$WORK/venv/bin/vidgate"
where=$("$WORK/venv/bin/python" -c 'import app; print(app.__file__)')
case $where in "$WORK/venv/"*) ;; *) fail "app was imported from $where, not from the installed wheel" ;; esac

"$VIDGATE" migrate
DEFAULT_DB="$HOME/.local/share/vidgate/vidgate.db"
test -f "$DEFAULT_DB" || fail "the default SQLite database is not at $DEFAULT_DB"
echo "wheel-check: migrated SQLite at the default path $DEFAULT_DB"

createdb -h 127.0.0.1 -U postgres "$PGDB"
VIDGATE_DATABASE_URL="$PG/$PGDB" "$VIDGATE" migrate
echo "wheel-check: migrated PostgreSQL database $PGDB"

SIM_PORT=$(free_port)
"$VIDGATE" simulator --port "$SIM_PORT" >"$WORK/simulator.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SIM_PORT/" 60

for url in "" "$PG/$PGDB"; do
  PORT=$(free_port)
  VIDGATE_DATABASE_URL="$url" VIDGATE_UPSTREAM_BASE_URL="http://127.0.0.1:$SIM_PORT" \
    VIDGATE_UPSTREAM_API_KEY=wheel-check-vendor-key VIDGATE_ADMIN_TOKEN=wheel-check-admin-token-0123456789abcdef \
    "$VIDGATE" serve --port "$PORT" >"$WORK/serve.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_http "http://127.0.0.1:$PORT/readyz" 60 || { cat "$WORK/serve.log" >&2; fail "serve did not become ready"; }
  echo "wheel-check: serve on ${url:-the default SQLite file} answered /readyz 200"
  kill "$pid"
  wait "$pid" || true
done
echo "wheel-check: ok"
