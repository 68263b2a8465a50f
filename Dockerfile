# CPU image: fanformer-serve with the demo model on port 8000.
#   docker build -t fanformer .
#   docker run --rm -p 8000:8000 fanformer            # then: curl localhost:8000/health
#   docker run --rm -p 8000:8000 -e FANFORMER_API_KEY=secret fanformer
#   docker run --rm -p 8000:8000 -v $PWD/ckpt:/ckpt fanformer fanformer-serve --host 0.0.0.0 --checkpoint /ckpt
# It installs exactly what `pip install .` installs; torch comes first from PyTorch's CPU index
# (same release as pyproject.toml pins) so that pip does not pull the multi-GB CUDA build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY fanformer ./fanformer
COPY quant ./quant
COPY server ./server
RUN pip install . && useradd --create-home fanformer

USER fanformer
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Exec form: fanformer-serve is PID 1 and gets SIGTERM itself; it drains (new requests get
# 503, running ones get up to --shutdown_timeout = 30 s, then ~7 s to stop), so stop with
# `docker stop -t 40`.
CMD ["fanformer-serve", "--host", "0.0.0.0", "--port", "8000"]
