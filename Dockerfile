# CPU image: fanformer-serve with the demo model on port 8000.
#   docker build -t fanformer .
#   docker build -t fanformer --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --rm -p 8000:8000 fanformer            # then: curl localhost:8000/health
#   docker run --rm -p 8000:8000 -e FANFORMER_API_KEY=secret fanformer
#   docker run --rm -p 8000:8000 -v $PWD/ckpt:/ckpt:ro fanformer fanformer-serve --host 0.0.0.0 /ckpt
# Built and run with podman on a machine without Docker Hub: scripts/docker_check.sh and
# docs/SERVING.md "Docker (CPU)".
# Layers: a virtualenv, torch, then the other dependencies (both read from pyproject.toml, so
# the pins live in one place), then the source with --no-deps: editing the source rebuilds
# only the last. torch comes from TORCH_INDEX_URL (PyTorch's CPU index by default) so that pip
# does not pull the multi-GB CUDA build from PyPI. The native CPU kernels (quant/native_cpu.py)
# are compiled in a stage of their own, for every ISA, and only the builds are copied: the
# image carries no compiler (gcc and its libraries are a few hundred MB).
# BASE_IMAGE needs python3 (3.10+) with its venv module, useradd and apt-get: python:3.11-slim,
# or Debian bookworm with python3-venv (what scripts/docker_check.sh builds with debootstrap).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS deps

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A pip config for the dependency layers only (not kept in the image), for a machine that
# reaches PyPI through a proxy with its own CA or has the CPU torch wheel on disk, e.g.
#   podman build -v ./build-pip:/tmp/build-pip:ro --build-arg PIP_CONFIG_FILE=/tmp/build-pip/pip.conf
# (scripts/docker_check.sh). Empty: pip's defaults.
ARG PIP_CONFIG_FILE=
# The venv makes `python` and `pip` the same on either base (Debian's own python3 has no
# `python` or `pip` command and refuses `pip install` outside a venv).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/torch.txt', 'w').write('\n'.join(d for d in deps if d.startswith('torch')) + '\n'); \
open('/tmp/deps.txt', 'w').write('\n'.join(d for d in deps if not d.startswith('torch')) + '\n')" \
    && pip install -r /tmp/torch.txt --index-url "${TORCH_INDEX_URL}" \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && pip install -r /tmp/deps.txt

FROM deps AS kernels
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev
COPY fanformer ./fanformer
COPY quant ./quant
RUN python -m quant.native_cpu --prebuild /opt/fanformer-kernels

FROM deps
ARG PIP_CONFIG_FILE=
COPY README.md ./
COPY fanformer ./fanformer
COPY quant ./quant
COPY server ./server
RUN pip install --no-deps . && useradd --create-home fanformer
COPY --from=kernels /opt/fanformer-kernels /opt/fanformer-kernels
ENV FANFORMER_PREBUILT_KERNELS=/opt/fanformer-kernels

USER fanformer
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Exec form: fanformer-serve is PID 1 and gets SIGTERM itself; it drains (new requests get
# 503, running ones get up to --shutdown_timeout = 30 s, then ~7 s to stop), so stop with
# `docker stop -t 40`.
STOPSIGNAL SIGTERM
CMD ["fanformer-serve", "--host", "0.0.0.0", "--port", "8000"]
