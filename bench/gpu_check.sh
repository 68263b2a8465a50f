#!/usr/bin/env bash
# bench/gpu_check.sh: the one GPU run of issue 17, in two halves.
#
#   bash bench/gpu_check.sh prepare   # here, with network: wheels into .whl/, text into .gpu_data/
#   bash bench/gpu_check.sh run       # on the GPU machine (no network), from the repo root
#
# `prepare` fetches the packages the device machine lacks (fastapi, uvicorn, sse-starlette,
# pydantic and their missing needs, bitsandbytes) as Python 3.12 x86-64 wheels, at the
# versions this checkout's .venv runs, and copies the training text into the checkout, both
# into folders git ignores (.git/info/exclude), so the device tool carries them (`carry`).
# `run` installs the wheels into /tmp/site without touching the machine's torch, then runs
# bench/gpu_check.py from the source tree (PYTHONPATH=., no pip install -e). Extra
# arguments after `run` go to gpu_check.py (e.g. --out "$OUT/gpu_check.json").
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.54.0 sse-starlette==3.7.0
        httptools==0.9.0 bitsandbytes==0.50.2)

case "${1:-}" in
  prepare)
    for dir in /.whl/ /.gpu_data/; do
      grep -qxF "$dir" .git/info/exclude 2>/dev/null || echo "$dir" >> .git/info/exclude
    done
    mkdir -p .whl .gpu_data
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    # The tree, the wheels and the text travel together under 64 MiB: bitsandbytes alone is
    # 43 MB, so the text is 3 documents of every 5 of train.jsonl (all four sources), gzipped.
    data=${GPU_CHECK_DATA:-../shared/data/train.jsonl}
    rm -f .gpu_data/train.txt
    [ -f .gpu_data/train.txt.gz ] || python3 -c '
import gzip, json, sys
docs = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
kept = [d for i, d in enumerate(docs) if i % 5 < 3]
with gzip.open(sys.argv[2], "wt", encoding="utf-8", compresslevel=9) as f:
    f.write("\n\n".join(kept) + "\n")
print(f"{len(kept)} of {len(docs)} documents")' "$data" .gpu_data/train.txt.gz
    du -sh .whl .gpu_data
    ;;
  run)
    shift
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site:.
    else
      export PYTHONPATH=.
    fi
    export PYTHONUNBUFFERED=1
    exec python3 bench/gpu_check.py --device cuda --train_data .gpu_data/train.txt.gz "$@"
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh prepare | run [gpu_check.py arguments]" >&2
    exit 2
    ;;
esac
