#!/usr/bin/env bash
# The seed's smoke flow against a running server: wait for /diag, pull, poll the job, /models, /chat.
#   scripts/smoke.sh [MODEL]      MODEL: a Hub repo id to pull first, or a local name (default smollm2:135m)
#   BASE=http://127.0.0.1:8005    where the server is
set -euo pipefail
BASE=${BASE:-http://127.0.0.1:8005}
MODEL=${1:-smollm2:135m}
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

for _ in $(seq 120); do curl -fs "$BASE/diag" >/dev/null && break; sleep 1; done
curl -fs "$BASE/diag" >/dev/null || { echo "server not answering at $BASE"; exit 1; }
echo "server up at $BASE"

if [[ "$MODEL" == */* ]]; then
  job=$(curl -fs "$BASE/pull" -H 'Content-Type: application/json' -d "{\"model\": \"$MODEL\"}" | json "['job_id']")
  echo "pull job $job"
  while :; do
    state=$(curl -fs "$BASE/jobs/$job")
    status=$(echo "$state" | json "['status']")
    echo "  $status $(echo "$state" | json "['progress']")"
    [ "$status" = succeeded ] && break
    [ "$status" = failed ] && { echo "pull failed: $(echo "$state" | json "['error']")"; exit 1; }
    sleep 1
  done
fi

curl -fs "$BASE/models" | json "['models']" >/dev/null
echo "models: $(curl -fs "$BASE/models" | python3 -c "import json,sys; print([m['name'] for m in json.load(sys.stdin)['models']])")"
reply=$(curl -fs "$BASE/chat" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \"temperature\": 0, \"max_tokens\": 32}")
echo "chat: $(echo "$reply" | json "['message']['content']")"
echo "smoke OK"
