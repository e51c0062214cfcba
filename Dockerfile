# One image for every tickq role: the command picks it.
#
#   docker run IMAGE worker --concurrency auto --health-port 9100
#   docker run IMAGE produce --input s3://... --output s3://... --months 2024-01
#   docker run IMAGE aggregator --health-port 9101
#   docker run IMAGE dlq list
#
# Build stage: installs tickq and its dependencies into a virtualenv (binary wheels only, so no
# compiler is needed). Final stage: the same pinned Python base, the virtualenv copied in, no
# pip, no build tools, no caches; runs as a numeric non-root user under dumb-init, so that
# SIGTERM reaches Python and the worker drains its jobs before it exits.
#
# Pin the base by digest too in your own registry if you need bit-for-bit rebuilds:
#   docker build --build-arg PYTHON_IMAGE=python:3.12.13-slim-trixie@sha256:... .
ARG PYTHON_IMAGE=python:3.12.13-slim-trixie

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# The build context is an allowlist (.dockerignore): pyproject.toml, README.md and the packages.
COPY . .

# --only-binary: a dependency without a wheel fails the build instead of pulling in a compiler.
# pip itself is removed from the virtualenv once it has done its work; the bytecode is compiled
# here because the final image may run on a read-only root filesystem.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: "dumb-init==1.2.5.post1" \
    && /opt/venv/bin/pip install --no-cache-dir --prefer-binary . \
    && /opt/venv/bin/pip uninstall --yes pip \
    && /opt/venv/bin/python -m compileall -q /opt/venv \
    && /opt/venv/bin/tickq --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="tickq" \
      org.opencontainers.image.description="tickq producer, worker, aggregator and dead-letter tools in one image" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric user and group (10001), so that Kubernetes can verify runAsNonRoot and file
# ownership is the same on every host. No home directory, no login shell. The base image's own
# pip goes too: nothing is installed at run time.
RUN groupadd --system --gid 10001 tickq \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tickq \
    && python -m pip uninstall --yes --no-cache-dir pip \
    && rm -rf /root/.cache /tmp/*

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TICKQ_HEARTBEAT_FILE=/tmp/tickq/heartbeat

# Scratch space and the heartbeat file live under /tmp (an emptyDir on Kubernetes, where the
# root filesystem is read-only).
WORKDIR /tmp
USER 10001:10001

# Prometheus /metrics and /healthz, when --health-port is given: 9100 worker, 9101 aggregator.
EXPOSE 9100 9101

# The worker and the aggregator touch the heartbeat file every 10 s while their loop is alive,
# whatever the broker is doing: a stuck process goes unhealthy, a broker outage does not make
# Docker restart every worker. One-shot roles (produce, gen, dlq) write no heartbeat: compose
# disables this check for them.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["tickq", "healthcheck", "--max-age", "60"]

# dumb-init is PID 1: it forwards SIGTERM to tickq (only to it, --single-child, so the worker
# decides how its job threads stop) and reaps zombies. tickq exits once its jobs in hand are
# done or requeued (--shutdown-timeout).
ENTRYPOINT ["dumb-init", "--single-child", "--", "tickq"]
CMD ["--help"]
