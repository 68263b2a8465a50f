#!/usr/bin/env bash
# Build the Docker image with podman (no daemon) and check it for real: /health, the
# HEALTHCHECK, a completion, a streamed chat, a SIGTERM drain under load (`podman stop -t 40`)
# and a checkpoint mounted as a volume. For a person, not CI; run as root from anywhere:
#   scripts/docker_check.sh
# The defaults fit a machine that reaches only PyPI and Debian's mirror (docs/SERVING.md
# "Docker (CPU)"); where Docker Hub and PyPI work directly, use
#   BASE_IMAGE=python:3.11-slim TORCH_WHEELS= PODMAN_CONF= scripts/docker_check.sh
# Everything it writes lies in three folders of its own under $WORK (.docker_check-*); at the end it removes the containers it started
# (not the images).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-localhost/fanformer:latest}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:3.11}  # built below with debootstrap if missing
TORCH_WHEELS=${TORCH_WHEELS-/opt/wheels}  # a folder holding the CPU torch wheel; empty: the index
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}  # the host's CAs, for pip; empty: none
PODMAN_CONF=${PODMAN_CONF-sandbox}  # sandbox: runc + ulimits this sandbox allows; empty: podman's
PORT=${PORT:-18123}
WORK=${WORK:-/tmp/fanformer-docker}
DEMO=$ROOT/fanformer/assets/demo
ROOTFS=$WORK/.docker_check-rootfs  # the two folders it deletes and rebuilds: names only
CTX=$WORK/.docker_check-ctx        # this script creates, so never a folder of the user's
OUT=$WORK/.docker_check-out       # its logs, streams and build config: also a name of its own
URL=http://127.0.0.1:$PORT
mkdir -p "$OUT/build-pip"
say() { printf '\n== %s\n' "$*"; }

if [[ $PODMAN_CONF == sandbox ]]; then
    # crun cannot run under this sandbox's hybrid cgroups, and podman's default ulimits
    # exceed what a process without CAP_SYS_RESOURCE may set.
    cat > "$OUT/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF
    export CONTAINERS_CONF=$OUT/containers.conf
fi

if ! podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE: debootstrap bookworm + python3.11"
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$ROOTFS" http://deb.debian.org/debian
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE"
fi

# pip settings for the dependency layers: the host's CAs and the local CPU torch wheel
# (PyPI's torch for Linux is the CUDA build with ~3 GB of nvidia-* wheels).
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
mounts=()
: > "$OUT/build-pip/pip.conf"
echo "[global]" >> "$OUT/build-pip/pip.conf"
if [[ -n $CA_BUNDLE ]]; then
    cp "$CA_BUNDLE" "$OUT/build-pip/ca.crt"
    echo "cert = /tmp/build-pip/ca.crt" >> "$OUT/build-pip/pip.conf"
fi
if [[ -n $TORCH_WHEELS ]]; then
    echo "find-links = /tmp/build-wheels" >> "$OUT/build-pip/pip.conf"
    mounts+=(-v "$TORCH_WHEELS:/tmp/build-wheels:ro")
    build_args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi
mounts+=(-v "$OUT/build-pip:/tmp/build-pip:ro")
build_args+=(--build-arg PIP_CONFIG_FILE=/tmp/build-pip/pip.conf)

build() {  # --format docker keeps HEALTHCHECK and STOPSIGNAL (OCI has no HEALTHCHECK)
    podman build --network=host --format docker "${mounts[@]}" "${build_args[@]}" \
        -t "$1" "$ROOT"
}
say "build"
start=$(date +%s); build "$IMAGE" 2>&1 | tee "$OUT/build1.log" | grep -E '^(\[[0-9/]+] )?STEP|^torch '
echo "build: $(( $(date +%s) - start )) s"

say "rebuild after a source-only change (a comment added to a copy of server/__init__.py)"
rm -rf "$CTX" && mkdir "$CTX"
cp -r "$ROOT"/{pyproject.toml,README.md,.dockerignore,Dockerfile,fanformer,quant,server} "$CTX/"
echo "# source-only change" >> "$CTX/server/__init__.py"
start=$(date +%s); ROOT=$CTX build "$IMAGE-srcchange" > "$OUT/build2.log" 2>&1
echo "rebuild: $(( $(date +%s) - start )) s"
grep -E '^(\[[0-9/]+] )?STEP|Using cache' "$OUT/build2.log" | sed -n '1,20p'
podman rmi "$IMAGE-srcchange" > /dev/null

say "image size"
podman image ls "$IMAGE" --format '{{.Repository}}:{{.Tag}} {{.Size}}'

ctrs=()
cleanup() { [[ ${#ctrs[@]} -eq 0 ]] || podman rm -f -t 0 "${ctrs[@]}" > /dev/null 2>&1 || true; }
trap cleanup EXIT
wait_health() {  # up to 120 s
    for _ in $(seq 120); do curl -sf "$URL/health" > /dev/null && return 0; sleep 1; done
    podman logs "$1" | tail -20; return 1
}
run_ctr() {  # name, then the command; podman times HEALTHCHECKs with systemd, which a
    # sandbox may lack, and the image's polls port 8000: the checks below run it by hand
    local name=$1; shift
    if podman container exists "$name"; then  # not ours to remove: it may be the user's
        echo "docker_check: a container named $name already exists; remove it" \
            "(podman rm -f $name) if it is a leftover of this script, then rerun" >&2
        exit 1
    fi
    podman run -d --name "$name" --network=host --no-healthcheck "$@" > /dev/null
    ctrs+=("$name")
}
start_streams() {  # 16 streamed completions of 500 tokens in the background, to $OUT/$1.N.sse
    local i
    for i in $(seq 16); do
        curl -sN --max-time 120 "$URL/v1/completions" -H 'Content-Type: application/json' \
            -d '{"prompt": "Once", "max_tokens": 500, "ignore_eos": true, "stream": true}' \
            > "$OUT/$1.$i.sse" &
    done
}

say "demo model: /health, HEALTHCHECK, a completion, a streamed chat"
run_ctr ff-demo "$IMAGE" fanformer-serve --host 127.0.0.1 --port "$PORT" --max_num_seqs 4
start=$(date +%s); wait_health ff-demo; echo "healthy after $(( $(date +%s) - start )) s"
curl -s "$URL/health"; echo
podman logs ff-demo 2>&1 | grep -E "native (CPU kernel|decode step)" || true  # on, without gcc
# The image's HEALTHCHECK polls port 8000; run the same command against $PORT.
podman exec ff-demo python -c "import urllib.request; urllib.request.urlopen('$URL/health', timeout=4)" \
    && echo "HEALTHCHECK command: ok"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "Alice was", "max_tokens": 16, "temperature": 0}'; echo
curl -sN "$URL/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": true}' \
    | tee "$OUT/chat.sse" | tail -3
echo "chat stream: $(grep -c '^data: {' "$OUT/chat.sse") chunks"

say "SIGTERM drain: 16 streams of 500 tokens, 4 at a time, then podman stop -t 40"
start_streams drain
sleep 2
echo "tokens streamed before the stop: $(cat "$OUT"/drain.*.sse | grep -c '^data: {' || true)/8000"
start=$(date +%s)
podman stop -t 40 ff-demo > /dev/null &
stopper=$!
sleep 1
echo "during the drain: /health -> $(curl -s -o /dev/null -w '%{http_code}' "$URL/health")," \
    "new request -> $(curl -s -o /dev/null -w '%{http_code}' "$URL/v1/completions" \
        -H 'Content-Type: application/json' -d '{"prompt": "x", "max_tokens": 1}')"
wait "$stopper"; echo "podman stop took $(( $(date +%s) - start )) s"
wait  # the streams
echo "exit code: $(podman inspect -f '{{.State.ExitCode}}' ff-demo)"
done_n=$(cat "$OUT"/drain.*.sse | grep -c '^data: \[DONE\]' || true)
length_n=$(cat "$OUT"/drain.*.sse | grep -c '"finish_reason": *"length"' || true)
echo "streams ended with [DONE]: $done_n/16; finished with length (500 tokens): $length_n/16"
podman logs ff-demo 2>&1 | tail -4

say "SIGTERM past --shutdown_timeout 2: the same 16 streams are aborted"
run_ctr ff-abort "$IMAGE" fanformer-serve --host 127.0.0.1 --port "$PORT" --max_num_seqs 4 \
    --shutdown_timeout 2
wait_health ff-abort
start_streams abort
sleep 2
start=$(date +%s)
podman stop -t 40 ff-abort > /dev/null
echo "podman stop took $(( $(date +%s) - start )) s"
wait
echo "exit code: $(podman inspect -f '{{.State.ExitCode}}' ff-abort)"
echo "streams ended with [DONE]: $(cat "$OUT"/abort.*.sse | grep -c '^data: \[DONE\]' || true)/16;" \
    "500 tokens: $(cat "$OUT"/abort.*.sse | grep -c '"finish_reason": *"length"' || true)/16;" \
    "error events 'aborted': $(cat "$OUT"/abort.*.sse | grep -c '"aborted"' || true)/16"
grep -h '"aborted"' "$OUT"/abort.*.sse | head -1

say "checkpoint mounted as a volume: $DEMO -> /ckpt"
run_ctr ff-volume -v "$DEMO:/ckpt:ro" "$IMAGE" fanformer-serve /ckpt --host 127.0.0.1 --port "$PORT"
wait_health ff-volume
curl -s "$URL/v1/models"; echo
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "ckpt", "prompt": "Alice was", "max_tokens": 16, "temperature": 0}'; echo
podman stop -t 40 ff-volume > /dev/null
echo "exit code: $(podman inspect -f '{{.State.ExitCode}}' ff-volume)"
