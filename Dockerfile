# syntax=docker/dockerfile:1
# Production image: gunicorn (gthread) serving app:app as a non-root user.
#   docker build -t creativity-server .
#   docker run -p 5000:5000 -e MONGO_URI=mongodb://... creativity-server
# See docs/production.md and compose.yaml (server + a one-node MongoDB replica set).

# ---- build: compile the dependencies (llama-cpp-python builds llama.cpp: needs a C/C++ toolchain + cmake)
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LLAMA_WHEEL_CACHE=/tmp/llama-wheels
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# dependencies first (this layer is rebuilt only when pyproject.toml changes)
COPY pyproject.toml scripts/install-llama.sh ./
# portable llama.cpp (no -march=native: the image runs on other CPUs than the one that built it),
# the same build scripts/run and scripts/test use
RUN pip install --upgrade pip && bash install-llama.sh
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
RUN pip install -r /tmp/requirements.txt

# ---- runtime: the venv, the source, no compilers
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /data /app && chown app:app /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=app:app . /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLASK_APP=app \
    HOST=0.0.0.0 \
    PORT=5000 \
    DATA_DIR=/data \
    LOG_JSON=true \
    WEB_CONCURRENCY=4
USER app
EXPOSE 5000
VOLUME ["/data"]
# liveness (/ping), not readiness (/health): a down SD WebUI or model server makes /health 503, and
# restarting this container would not bring either back (docs/production.md, "Health")
HEALTHCHECK --interval=30s --timeout=6s --start-period=30s --retries=3 \
  CMD python -c "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ.get('PORT', '5000'), timeout=5).status == 200 else 1)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
