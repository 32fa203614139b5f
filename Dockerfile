# syntax=docker/dockerfile:1
#
# stepfleet worker image. One image serves every role: `worker` (default), `migrate`,
# `declare`, `module push`, `create`, `status`. Configuration comes only from the
# environment at run time (STEPFLEET_*, see stepfleet/workers/settings.py): nothing secret
# is baked in.
#
#   docker build -t stepfleet:latest .
#   docker run --rm -e STEPFLEET_DATABASE_URL=... -e STEPFLEET_AMQP_URL=... stepfleet:latest

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# builder: a wheel of stepfleet plus wheels of all its dependencies. On amd64 every
# dependency comes as a ready-made manylinux wheel, so no compiler is needed.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

WORKDIR /src

# Only what the hatchling build reads: pyproject.toml, the readme it names, the package,
# and the top-level migrations that pyproject force-includes as stepfleet/store/migrations.
COPY pyproject.toml README.md ./
COPY stepfleet ./stepfleet
COPY migrations ./migrations

RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels . \
    && ls /wheels/stepfleet-*.whl

# ---------------------------------------------------------------------------------------------
# runtime: a virtualenv with the wheels installed offline; no build tools, no sources.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The wheels are bind-mounted from the builder, so they never become a layer of this image.
# pip byte-compiles at install time, so the read-only, non-root runtime never writes .pyc.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links=/wheels stepfleet \
    && /opt/venv/bin/stepfleet --help > /dev/null

# The only places the worker writes: the compiled-module cache (below XDG_CACHE_HOME, so the
# default STEPFLEET_MODULE_CACHE_DIR is /var/cache/stepfleet/modules) and its health file in
# /tmp. With a read-only root file system, mount writable volumes on both (Kubernetes:
# deploy/kubernetes/base/worker-deployment.yaml).
ENV XDG_CACHE_HOME=/var/cache

RUN groupadd --system --gid 10001 stepfleet \
    && useradd --system --uid 10001 --gid stepfleet --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin stepfleet \
    && mkdir -p /app /var/cache/stepfleet \
    && chown stepfleet:stepfleet /app /var/cache/stepfleet \
    && chmod 0700 /var/cache/stepfleet

# The example tenant modules (committed .wasm builds plus their sources and READMEs, ~55 KB),
# so a fresh deployment can be tried without the host toolchain:
#   stepfleet module push /app/guest/examples/order/order.wasm --tenant acme
# (`stepfleet demo` does not find them here: it looks next to a source checkout.)
COPY guest/examples /app/guest/examples

WORKDIR /app
# Numeric so that runtimes enforcing runAsNonRoot can verify it.
USER 10001:10001

# The worker traps SIGTERM and finishes in-flight steps (STEPFLEET_SHUTDOWN_GRACE_SECONDS,
# default 30 s); give it longer than that before SIGKILL (compose: stop_grace_period).
STOPSIGNAL SIGTERM

ENTRYPOINT ["stepfleet"]
CMD ["worker"]
