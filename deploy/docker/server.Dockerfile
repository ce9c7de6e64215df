# syntax=docker/dockerfile:1
# The voicegate front server: decodes and preprocesses audio, calls an external Triton
# (VOICEGATE_TRITON_URL=HOST:PORT of its gRPC endpoint). Build from the repository root:
#
#   docker build -f deploy/docker/server.Dockerfile -t voicegate-server:0.1.0 .
#
# voicegate is installed without the `export` and `triton` extras: no torch, no embedded
# Triton. Run it with VOICEGATE_TRITON_URL set; without it `serve` would look for the
# embedded Triton of the development setup and stop.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: generate the gRPC stubs, install voicegate into a virtual environment ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install --yes --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
# The stub generator has its own environment, so it never reaches the runtime image.
RUN python -m venv /opt/protoc \
    && /opt/protoc/bin/pip install "grpcio-tools>=1.81"
WORKDIR /src
COPY Makefile pyproject.toml README.md ./
COPY proto/voicegate/ proto/voicegate/
COPY server/ server/
# `make proto`'s generation step (server/api/ from proto/), run with the build-stage Python.
RUN make stubs PROTOC_PYTHON=/opt/protoc/bin/python
# The service and its runtime dependencies only. The checks stop the build if the stubs are
# missing or torch / the embedded Triton slipped in.
RUN python -m venv /opt/voicegate \
    && /opt/voicegate/bin/pip install /src \
    && cd / \
    && /opt/voicegate/bin/python -c "import server.api.voicegate.v1.speaker_pb2_grpc" \
    && /opt/voicegate/bin/python -c "import importlib.util as u; \
bad = [m for m in ('torch', 'pytriton', 'onnx') if u.find_spec(m)]; assert not bad, bad"

# --- runtime: the virtual environment on a clean slim Python, as an unprivileged user -------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="voicegate-server" \
      org.opencontainers.image.description="voicegate gRPC front server (speaker embedding and verification; inference in Triton)" \
      org.opencontainers.image.version="0.1.0"
# /var/lib/voicegate: the state directory, where the default speaker store (SQLite) lives;
# mount a volume there (compose), or use PostgreSQL (VOICEGATE_STORE_URL) for replicas.
RUN groupadd --system --gid 10001 voicegate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/voicegate --create-home \
       --shell /usr/sbin/nologin voicegate \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/voicegate
COPY --from=build /opt/voicegate /opt/voicegate
# One BLAS/OpenMP thread: more fight the preprocessing threads for the cores (see Makefile).
# numba (librosa) caches compiled functions; the site-packages are read-only, /tmp is not.
ENV PATH=/opt/voicegate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    NUMBA_CACHE_DIR=/tmp/numba \
    VOICEGATE_HOST=[::] \
    VOICEGATE_PORT=50051 \
    VOICEGATE_STATE_DIR=/var/lib/voicegate
USER 10001:10001
WORKDIR /home/voicegate
EXPOSE 50051
# The gRPC health service: SERVING once Triton's models are ready (exit 1 otherwise).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["voicegate", "health", "--timeout", "4"]
ENTRYPOINT ["voicegate"]
CMD ["serve"]
