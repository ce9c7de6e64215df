# syntax=docker/dockerfile:1
# The export step: GE2E weights -> validated ONNX models -> Triton model repository for the
# GPU (`voicegate export --target gpu`: ge2e_fp32 and ge2e_fp16 on onnxruntime_onnx).
# Build from the repository root. Two uses:
#
# 1. A models image (the default, last stage): the repository baked into a small image that
#    a Kubernetes initContainer copies into Triton's model volume (deploy/k8s/triton.yaml).
#    Pass development speech so the fp16 model is checked on real utterances:
#
#      docker buildx build -f deploy/docker/export.Dockerfile -t voicegate-models:0.1.0 \
#        --build-context devdata=../shared/data/librispeech-train-clean-100 .
#
# 2. The exporter as a tool, writing to a mounted folder (deploy/compose: `export` service):
#
#      docker build -f deploy/docker/export.Dockerfile --target exporter -t voicegate-export .
#      docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/build:/out" voicegate-export

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- exporter: voicegate with the export extra (torch CPU wheel, onnx) ---------------------
FROM ${PYTHON_IMAGE} AS exporter
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    NUMBA_CACHE_DIR=/tmp/numba
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY export/ export/
# torch first from the CPU index (the export runs on the CPU; no CUDA libraries), then the
# rest; resemblyzer ships the GE2E weights and comes without its own requirements.
RUN python -m venv /opt/voicegate \
    && /opt/voicegate/bin/pip install --index-url https://download.pytorch.org/whl/cpu \
       "torch==2.13.0" \
    && /opt/voicegate/bin/pip install "/src[export]" \
    && /opt/voicegate/bin/pip install --no-deps resemblyzer==0.1.4
ENV PATH=/opt/voicegate/bin:$PATH
RUN groupadd --system --gid 10001 voicegate \
    && useradd --system --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin voicegate
USER 10001:10001
WORKDIR /home/voicegate
ENTRYPOINT ["voicegate", "export", "--target", "gpu", "--repository", "/out/model_repository_gpu"]

# --- devdata: empty unless `--build-context devdata=DIR` supplies development speech -------
FROM scratch AS devdata

# --- repository: run the export (validation on dev speech when given) ----------------------
FROM exporter AS repository
USER root
RUN --mount=type=bind,from=devdata,target=/data \
    if find /data -maxdepth 1 \( -name '*.flac' -o -name '*.wav' \) | grep -q .; then \
        export VOICEGATE_DATA_DIR=/data; \
    else \
        echo "WARNING: no --build-context devdata: real-speech checks are skipped" >&2; \
    fi \
    && voicegate export --target gpu --repository /models

# --- models: only the repository, for an initContainer to copy -----------------------------
FROM busybox:1.37 AS models
LABEL org.opencontainers.image.title="voicegate-models" \
      org.opencontainers.image.description="Triton model repository of voicegate (GPU target)"
COPY --from=repository /models /models
USER 65534:65534
CMD ["cp", "-R", "/models/.", "/model-repository/"]
