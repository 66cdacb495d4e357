#!/usr/bin/env bash
# Webhook drain A/B (bench/experiments/regress-ab/README.md): wh.sh REPO_DIR [ROWS] [extra VIDGATE_X=Y ...]
# Fresh PostgreSQL db migrated by REPO_DIR, one tenant (operator API), ROWS pending deliveries (default
# 8,000, ~600-byte payloads) over 4 healthy local receivers (bench/receiver.py of this worktree, the
# same for both sides); one `vidgate worker` of REPO_DIR drains them. Prints deliveries/s (first to last
# arrival, as the bench's webhooks phase), the worker's CPU ms per delivery (/proc), the PostgreSQL
# backends' CPU ms per delivery, and statements and transactions per delivery (pg_stat_statements /
# pg_stat_database deltas for this database only; nothing is reset, other sessions' stats stay).
set -euo pipefail
REPO=$(cd "$1" && pwd); ROWS=${2:-8000}; shift; shift || true
HERE=$(cd "$(dirname "$0")/../../.." && pwd)  # this worktree: its receiver serves both sides
V=$REPO/.venv/bin
TAG=w$$; DB=vg_wh_$TAG; BASE=$((20000 + RANDOM % 9000)); SP=$BASE GP=$((BASE+1)); RP="$((BASE+2)),$((BASE+3)),$((BASE+4)),$((BASE+5))"
PSQL="psql -qAt -h 127.0.0.1 -U postgres"
$PSQL -c "create database $DB" >/dev/null
WD=$(mktemp -d)
cleanup(){ kill ${SIMPID:-} ${GWPID:-} ${RECPID:-} ${WKPID:-} 2>/dev/null || true; wait 2>/dev/null || true; $PSQL -c "drop database if exists $DB with (force)" >/dev/null; rm -rf $WD; }
trap cleanup EXIT
export VIDGATE_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/$DB VIDGATE_UPSTREAM_BASE_URL=http://127.0.0.1:$SP \
  VIDGATE_UPSTREAM_API_KEY=vendorkey VIDGATE_ADMIN_TOKEN=admintoken123456789-0123456789abcdef VIDGATE_WEBHOOK_ALLOW_PRIVATE=true \
  VIDGATE_OUTPUT_HOSTS=127.0.0.1:$SP VIDGATE_OUTPUTS_STORE=$WD/out VIDGATE_RUN_WORKER=false VIDGATE_LOG_LEVEL=WARNING \
  VIDGATE_REHOST_OUTPUTS=false
for kv in "$@"; do export "$kv"; done
(cd $REPO && $V/vidgate migrate >/dev/null)
(cd $HERE && exec .venv/bin/python -m bench.receiver --ports $RP >$WD/rec.log 2>&1) & RECPID=$!
(cd $REPO && exec $V/vidgate serve --port $GP >$WD/gw.log 2>&1) & GWPID=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:$GP/readyz >/dev/null 2>&1 && break; sleep 0.1; done
T=$(curl -sf -H "Authorization: Bearer admintoken123456789-0123456789abcdef" -H 'content-type: application/json' -d '{"name":"q","budgetCents":1000000000,"budgetPeriod":"month","webhookUrl":"http://127.0.0.1:'$((BASE+2))'/hook"}' http://127.0.0.1:$GP/admin/v1/tenants | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
kill $GWPID; wait $GWPID 2>/dev/null || true; GWPID=
PAY=$(python3 -c 'import json;print(json.dumps({"type":"prediction.succeeded","data":{"id":"p"*26,"status":"succeeded","model":"ltx-2-19b","output":["https://example.com/"+"x"*200+".mp4"],"completedAt":"2026-11-30T00:00:00Z","usage":{"costCents":25}}}))')
$PSQL -d $DB -c "insert into webhook_deliveries (id, tenant_id, prediction_id, event_type, url, target_host, payload, status, attempts, next_attempt_at, created_at)
  select 'wh_'||lpad(g::text, 10, '0'), '$T', 'p_'||g, 'prediction.succeeded',
         'http://127.0.0.1:'||($BASE+2+g%4)||'/hook', '127.0.0.1:'||($BASE+2+g%4), '$PAY', 'pending', 0, now(), now()
  from generate_series(1, $ROWS) g" >/dev/null
DBID=$($PSQL -c "select oid from pg_database where datname='$DB'")
$PSQL -d $DB -c "create extension if not exists pg_stat_statements" >/dev/null  # the view; the data is the cluster's
for i in $(seq 50); do curl -sf http://127.0.0.1:$((BASE+2))/_stats >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf -XPOST http://127.0.0.1:$((BASE+2))/_reset >/dev/null
STMT0=$($PSQL -d $DB -c "select coalesce(sum(calls),0) from pg_stat_statements where dbid=$DBID and query not like 'select count(*) from webhook_deliveries%' and query not like '%pg_stat_statements%'")
XACT0=$($PSQL -c "select xact_commit+xact_rollback from pg_stat_database where datid=$DBID")
(cd $REPO && exec $V/vidgate worker >$WD/wk.log 2>&1) & WKPID=$!
STARTED=$(date +%s.%N)
# PROFILE=out.txt: py-spy (of this worktree's venv) samples the worker for the first 15 s, collapsed stacks
if [ -n "${PROFILE:-}" ]; then sleep 1; $HERE/.venv/bin/py-spy record --pid $WKPID -d 15 --format raw -o $PROFILE >/dev/null 2>&1 & fi
while :; do
  N=$(curl -sf http://127.0.0.1:$((BASE+2))/_stats?lags=0 | python3 -c 'import sys,json;print(sum(v["count"] for v in json.load(sys.stdin).values()))')
  if [ -z "${N0:-}" ] && [ "$N" -gt 0 ]; then N0=$N; WCPU0=$(awk '{print $14+$15}' /proc/$WKPID/stat); fi  # startup excluded
  [ "$N" -ge "$ROWS" ] && break
  python3 -c "import time,sys; sys.exit(time.time()-$STARTED>120)" || { echo "timeout: $N of $ROWS"; tail -5 $WD/wk.log; exit 1; }
  sleep 0.2
done
# The outcomes are stored after the arrivals: wait until every row is recorded.
POLLS=0; while [ "$($PSQL -d $DB -c "select count(*) from webhook_deliveries where status='pending'")" != 0 ]; do POLLS=$((POLLS+1)); sleep 0.1; done; POLLS=$((POLLS+1))
WCPU=$(awk '{print $14+$15}' /proc/$WKPID/stat)
BCPU=0; for p in $($PSQL -c "select pid from pg_stat_activity where datname='$DB' and pid<>pg_backend_pid()"); do
  [ -r /proc/$p/stat ] && BCPU=$((BCPU + $(awk '{print $14+$15}' /proc/$p/stat))); done
STMT1=$($PSQL -d $DB -c "select coalesce(sum(calls),0) from pg_stat_statements where dbid=$DBID and query not like 'select count(*) from webhook_deliveries%' and query not like '%pg_stat_statements%'")
sleep 2  # backends flush pg_stat_database counters at most once a second
XACT1=$($PSQL -c "select xact_commit+xact_rollback from pg_stat_database where datid=$DBID")
STATS=$(curl -sf http://127.0.0.1:$((BASE+2))/_stats?lags=0)
LOAD=$(cut -d' ' -f1 /proc/loadavg)
python3 - "$STATS" <<PY
import json, sys
s = json.loads(sys.argv[1]); firsts=[v["first"] for v in s.values() if v["first"]]; lasts=[v["last"] for v in s.values() if v["last"]]
n = sum(v["count"] for v in s.values()); dup = sum(v["duplicates"] for v in s.values()); span = max(lasts)-min(firsts)
print(f"$(basename $REPO) rows=$ROWS rate={(n-1)/span:.0f}/s span={span:.2f}s dup={dup} worker_cpu_ms/deliv={($WCPU-$WCPU0)*10/(n-$N0):.3f} "
      f"pg_cpu_ms/deliv={$BCPU*10/n:.3f} stmts/deliv={($STMT1-$STMT0)/n:.3f} xacts/deliv={($XACT1-$XACT0-$POLLS-1)/n:.3f} load1=$LOAD $*")
PY
if [ -n "${KEEP_STMTS:-}" ]; then $PSQL -d $DB -c "select calls, round(total_exec_time::numeric,1) ms, left(regexp_replace(query,'\s+',' ','g'),140) from pg_stat_statements where dbid=$DBID order by calls desc limit 12" ; $PSQL -d $DB -c "select calls, round(total_exec_time::numeric,1) ms, length(query) len from pg_stat_statements where dbid=$DBID and query like 'UPDATE webhook_deliveries SET lease_owner%' order by len"; fi
