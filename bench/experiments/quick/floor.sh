#!/usr/bin/env bash
# floor.sh REPO CONC SECONDS: the bench's fair floor (uvicorn) in front of the simulator, submit at CONC.
set -euo pipefail
REPO=$(cd "$1" && pwd); C=$2; SECS=$3; V=$REPO/.venv/bin
SP=$((30000 + RANDOM % 10000)); FP=$((SP+1))
$V/vidgate simulator --port $SP --completion-s 3600 >/dev/null 2>&1 & SIMPID=$!
(cd $REPO && exec $V/python -m bench.floor --port $FP --upstream http://127.0.0.1:$SP --server uvicorn >/dev/null 2>&1) & FPID=$!
trap 'kill $SIMPID $FPID 2>/dev/null; wait 2>/dev/null' EXIT
for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:$FP/ 2>/dev/null && break; sleep 0.1; done
cat > /tmp/floor$$.lua <<LUA
wrk.method="POST"; wrk.body='{"image": "https://example.com/cat.png", "prompt": "a cat", "resolution": "480p", "duration": 5}'; wrk.headers["Content-Type"]="application/json"; wrk.headers["Authorization"]="Bearer x"
LUA
wrk -t1 -c$C -d2s -s /tmp/floor$$.lua http://127.0.0.1:$FP/api/v1/models/ltx-2-19b/generate >/dev/null
wrk -t1 -c$C -d${SECS}s --latency -s /tmp/floor$$.lua http://127.0.0.1:$FP/api/v1/models/ltx-2-19b/generate | awk '/Requests\/sec|50%|99%|Non-2xx/'
rm -f /tmp/floor$$.lua
