#!/usr/bin/env bash
# Quick A/B harness: quick.sh REPO_DIR [submit|get] CONC SECONDS [extra VIDGATE_X=Y ...]
# Starts simulator + `vidgate serve` (PostgreSQL, fresh db, worker off unless VIDGATE_RUN_WORKER=true given),
# makes a tenant, runs wrk, prints req/s, p50/p99 and the gateway's CPU ms per request.
set -euo pipefail
REPO=$(cd "$1" && pwd); MODE=$2; C=$3; SECS=$4; shift 4
V=$REPO/.venv/bin
TAG=q$$; DB=vg_quick_$TAG; SP=$((20000 + RANDOM % 10000)); GP=$((SP+1))
psql -q -h 127.0.0.1 -U postgres -c "create database $DB" >/dev/null
WD=$(mktemp -d)
cleanup(){ kill $SIMPID $GWPID 2>/dev/null || true; wait 2>/dev/null || true; psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $DB with (force)" >/dev/null; rm -rf $WD; }
trap cleanup EXIT
export VIDGATE_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/$DB VIDGATE_UPSTREAM_BASE_URL=http://127.0.0.1:$SP \
  VIDGATE_UPSTREAM_API_KEY=vendorkey VIDGATE_ADMIN_TOKEN=admintoken123456789-0123456789abcdef VIDGATE_WEBHOOK_ALLOW_PRIVATE=true \
  VIDGATE_OUTPUT_HOSTS=127.0.0.1:$SP VIDGATE_OUTPUTS_STORE=$WD/out VIDGATE_RUN_WORKER=false VIDGATE_LOG_LEVEL=WARNING
for kv in "$@"; do export "$kv"; done
(cd $REPO && $V/vidgate migrate >/dev/null)
$V/vidgate simulator --port $SP --completion-s 3600 >$WD/sim.log 2>&1 & SIMPID=$!
(cd $REPO && exec $V/vidgate serve --port $GP >$WD/gw.log 2>&1) & GWPID=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:$GP/readyz >/dev/null 2>&1 && break; sleep 0.1; done
T=$(curl -sf -H "Authorization: Bearer admintoken123456789-0123456789abcdef" -H 'content-type: application/json' -d '{"name":"q","budgetCents":1000000000,"budgetPeriod":"month"}' http://127.0.0.1:$GP/admin/v1/tenants | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
K=$(curl -sf -H "Authorization: Bearer admintoken123456789-0123456789abcdef" -H 'content-type: application/json' -d '{"name":"q"}' http://127.0.0.1:$GP/admin/v1/tenants/$T/keys | python3 -c 'import sys,json;print(json.load(sys.stdin)["key"])')
BODY='{"image": "https://example.com/cat.png", "prompt": "a cat", "resolution": "480p", "duration": 5}'
PID=$(head -n1 <(pgrep -f "vidgate serve --port $GP" | sort -n | tail -1))
cat > $WD/post.lua <<LUA
wrk.method="POST"; wrk.body='$BODY'; wrk.headers["Content-Type"]="application/json"; wrk.headers["Authorization"]="Bearer $K"
LUA
if [ "$MODE" = get ]; then
  ID=$(curl -sf -H "Authorization: Bearer $K" -H 'content-type: application/json' -d "$BODY" http://127.0.0.1:$GP/api/v1/models/ltx-2-19b/generate | python3 -c 'import sys,json;print(json.load(sys.stdin)["id"])')
  cat > $WD/run.lua <<LUA
wrk.method="GET"; wrk.headers["Authorization"]="Bearer $K"
LUA
  URL=http://127.0.0.1:$GP/api/v1/predictions/$ID
else
  cp $WD/post.lua $WD/run.lua; URL=http://127.0.0.1:$GP/api/v1/models/ltx-2-19b/generate
fi
wrk -t1 -c$C -d2s -s $WD/run.lua $URL >/dev/null
cpu0=$(awk '{print $14+$15}' /proc/$PID/stat)
OUT=$(wrk -t1 -c$C -d${SECS}s --latency -s $WD/run.lua $URL)
cpu1=$(awk '{print $14+$15}' /proc/$PID/stat)
REQ=$(echo "$OUT" | awk '/requests in/{print $1}')
NON2=$(echo "$OUT" | awk '/Non-2xx/{print $4}')
RPS=$(echo "$OUT" | awk '/Requests\/sec/{print $2}')
P50=$(echo "$OUT" | awk '$1=="50%"{print $2}'); P99=$(echo "$OUT" | awk '$1=="99%"{print $2}')
CPUMS=$(python3 -c "print(round(($cpu1-$cpu0)*10/$REQ,3))")
echo "$(basename $REPO) $MODE c=$C rps=$RPS p50=$P50 p99=$P99 cpu_ms/req=$CPUMS non2xx=${NON2:-0} $*"
