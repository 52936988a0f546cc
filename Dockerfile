# syntax=docker/dockerfile:1
# The operator image: `docker build -t kaos-modelapi:0.1.0 .`
#
# builder: one virtualenv with the operator and its runtime dependencies, each at the version pinned in
#          requirements.lock, bytecode compiled ahead of time.
# final:   the same Python base plus that virtualenv only; runs as a numeric non-root user and writes
#          nothing at run time, so it works with readOnlyRootFilesystem.
# tests/test_dockerfile.py replays the builder's RUN steps outside Docker, so keep every RUN step
# relative to WORKDIR and $VIRTUAL_ENV (no other absolute paths).

# Both stages must use the same base: the venv's python is a symlink to the base image's interpreter.
ARG PYTHON_IMAGE=python:3.11-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
ENV VIRTUAL_ENV=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install uv==0.13.8
WORKDIR /src
# Dependencies first, in their own layer, so a source change does not reinstall them. Only the runtime
# dependencies declared in pyproject.toml are installed; requirements.lock (which also pins the dev extra)
# constrains every one of them, transitive ones included, to its locked version.
COPY pyproject.toml requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv venv --python python3.11 "$VIRTUAL_ENV" \
 && uv pip install --python "$VIRTUAL_ENV/bin/python" -r pyproject.toml -c requirements.lock
COPY kaos_modelapi ./kaos_modelapi
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python "$VIRTUAL_ENV/bin/python" --no-deps . \
 && "$VIRTUAL_ENV/bin/kaos-modelapi" --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kaos-modelapi" \
      org.opencontainers.image.description="Kubernetes operator for the ModelAPI resource (kaos.tools/v1alpha1)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=builder /opt/venv /opt/venv
# 65532 is the conventional "nonroot" UID/GID; no passwd entry is needed for a numeric user.
USER 65532:65532
# Metrics (/metrics) and health probes (/healthz, /readyz).
EXPOSE 8080 8081
ENTRYPOINT ["kaos-modelapi", "run"]
