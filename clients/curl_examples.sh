#!/usr/bin/env bash
# curl against fanformer-serve (or any OpenAI-compatible server).
#   BASE=http://127.0.0.1:8000 API_KEY=... bash clients/curl_examples.sh
# Without API_KEY no Authorization header is sent (the server's default needs none).
set -euo pipefail
BASE=${BASE:-http://127.0.0.1:8000}
AUTH=()
if [[ -n "${API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer $API_KEY"); fi
MODEL=${MODEL:-$(curl -s "${AUTH[@]}" "$BASE/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')}

echo "== health, version, models"
curl -s "$BASE/health"; echo
curl -s "$BASE/version"; echo
curl -s "${AUTH[@]}" "$BASE/v1/models"; echo

echo "== completion"
curl -s "${AUTH[@]}" "$BASE/v1/completions" -H "Content-Type: application/json" -d "{
  \"model\": \"$MODEL\", \"prompt\": \"Alice was beginning\", \"max_tokens\": 32,
  \"temperature\": 0.7, \"top_p\": 0.9, \"stop\": [\"\\n\\n\"]
}"; echo

echo "== chat completion"
curl -s "${AUTH[@]}" "$BASE/v1/chat/completions" -H "Content-Type: application/json" -d "{
  \"model\": \"$MODEL\", \"max_completion_tokens\": 32,
  \"messages\": [{\"role\": \"system\", \"content\": \"You are terse.\"},
                 {\"role\": \"user\", \"content\": \"Who is the White Rabbit?\"}]
}"; echo

echo "== streaming completion (-N: print events as they arrive), with usage at the end"
curl -sN "${AUTH[@]}" "$BASE/v1/completions" -H "Content-Type: application/json" -d "{
  \"model\": \"$MODEL\", \"prompt\": \"Down the rabbit hole\", \"max_tokens\": 16,
  \"stream\": true, \"stream_options\": {\"include_usage\": true}
}"

echo "== streaming chat"
curl -sN "${AUTH[@]}" "$BASE/v1/chat/completions" -H "Content-Type: application/json" -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 16, \"stream\": true,
  \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]
}"

echo "== score a text: echo + max_tokens 0 + logprobs returns the prompt's token logprobs"
curl -s "${AUTH[@]}" "$BASE/v1/completions" -H "Content-Type: application/json" -d "{
  \"model\": \"$MODEL\", \"prompt\": \"The Queen of Hearts\", \"max_tokens\": 0,
  \"echo\": true, \"logprobs\": 1
}"; echo

echo "== tokenize / detokenize"
curl -s "${AUTH[@]}" "$BASE/tokenize" -H "Content-Type: application/json" \
  -d '{"prompt": "Alice"}'; echo
curl -s "${AUTH[@]}" "$BASE/detokenize" -H "Content-Type: application/json" \
  -d '{"tokens": [1, 2, 3]}'; echo

echo "== metrics (Prometheus text format)"
curl -s "$BASE/metrics" | grep -E '^fanformer_(num_requests|kv_cache|generation_tokens)' || true
