#!/bin/bash
# Rehearsal of docs/SERVING.md "Multi-machine set-up": two Ray nodes on ONE machine (a head and
# a worker joined by address, one CPU each), 2 replicas of the demo model (one per node), the
# official openai client through the endpoint, then SIGTERM (drain) and ray stop. Refuses to
# stop a Ray it did not start. Usage: bash bench/ray_two_nodes.sh
set -u
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH
export RAY_AUTH_MODE=token   # ray start --head enables token auth; every joiner must use it (token: ~/.ray/auth_token)
HEAD_PORT=${HEAD_PORT:-6390}; DASH_PORT=${DASH_PORT:-8275}; SERVE_PORT=${SERVE_PORT:-8123}
TMP=$(mktemp -d)   # this script's own folder: its serve log, removed at exit
trap 'rm -rf "$TMP"' EXIT
if pgrep -f gcs_server >/dev/null; then echo "a Ray cluster already runs on this machine: not starting one"; exit 1; fi
echo "== 1. head node"; ray start --head --node-ip-address 127.0.0.1 --port $HEAD_PORT --num-cpus 1 \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port $DASH_PORT --disable-usage-stats 2>&1 | tail -3
echo "== 2. worker node"; ray start --address 127.0.0.1:$HEAD_PORT --node-ip-address 127.0.0.1 --num-cpus 1 --disable-usage-stats 2>&1 | tail -2
ray status --address 127.0.0.1:$HEAD_PORT 2>&1 | sed -n '/Active:/,/Pending:/p'
echo "== 3. fanformer-serve --ray --address"
fanformer-serve --ray --address 127.0.0.1:$HEAD_PORT --port $SERVE_PORT --num_replicas 2 --replica_cpus 1 \
  --shutdown_timeout 5 > "$TMP/serve.log" 2>&1 &
SERVE_PID=$!
for i in $(seq 1 150); do curl -sf http://127.0.0.1:$SERVE_PORT/health >/dev/null && break; sleep 2; done
curl -s http://127.0.0.1:$SERVE_PORT/health; echo
echo "== replicas and their nodes (Ray's state API)"
RAY_ADDRESS=127.0.0.1:$HEAD_PORT ray list actors --filter "class_name=ServeReplica:fanformer:FanformerReplica" --filter state=ALIVE 2>&1 | grep -E "ACTOR_ID|ServeReplica" 
ray list nodes --address http://127.0.0.1:$DASH_PORT 2>&1 | grep -E "NODE_ID|ALIVE"
echo "== 4. the official openai client, through the endpoint"
timeout 120 python clients/openai_client.py --base_url http://127.0.0.1:$SERVE_PORT/v1 2>&1 | tail -15
echo "== 8 concurrent streams"
timeout 120 python - <<PY
import concurrent.futures as cf, openai
c = openai.OpenAI(base_url="http://127.0.0.1:$SERVE_PORT/v1", api_key="EMPTY", max_retries=0)
def one(i):
    s = c.chat.completions.create(model="fanformer-demo", messages=[{"role": "user", "content": f"Story {i}"}], max_tokens=24, stream=True)
    return sum(1 for ch in s if ch.choices and ch.choices[0].delta.content)
with cf.ThreadPoolExecutor(8) as ex: print("chunks per stream:", list(ex.map(one, range(8))))
PY
echo "== 5. SIGTERM to fanformer-serve (drain, delete the app)"
kill -TERM $SERVE_PID; wait $SERVE_PID; echo "fanformer-serve exit: $?"
tail -5 "$TMP/serve.log"
echo "== 6. ray stop (only if the one GCS on this machine is ours)"
if [ "$(pgrep -f gcs_server | wc -l)" = 1 ] && pgrep -af gcs_server | grep -q -- "--gcs_server_port=$HEAD_PORT"; then ray stop 2>&1 | tail -1; else echo "another cluster runs here: not stopping"; fi
