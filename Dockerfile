# One image for every Tessera process; the command picks the service (see docker-compose.yml
# and k8s/base). Build:
#   docker build -t tessera:local .                                   # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t tessera:local-cu128 .   # CUDA torch
# TORCH_VARIANT names a wheel index of the PyTorch project (cpu, cu126, cu128, ...): pick one
# that publishes the torch version pinned in pyproject.toml. The CUDA wheels carry the CUDA
# runtime; the node needs only the NVIDIA driver and container toolkit.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- pins: the torch requirement, read from pyproject.toml so the version lives in one place.
FROM ${PYTHON_IMAGE} AS pins
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; \
deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; \
(torch,) = [d for d in deps if d.replace(' ', '').startswith('torch==')]; \
open('/torch-requirement.txt', 'w').write(torch + '\\n')"

# --- build: a virtual environment with torch (from the chosen index) and then Tessera.
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first: the largest layer, rebuilt only when its pin or the variant changes.
COPY --from=pins /torch-requirement.txt /tmp/torch-requirement.txt
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        -r /tmp/torch-requirement.txt
COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY services /src/services
# A regular (not editable) install: the runtime image needs no source tree. The torch already
# installed satisfies the pin (a local version such as 2.13.0+cpu matches ==2.13.0).
RUN pip install /src \
    && python -c "import tessera, services.aggregator.main, services.clustering.main, services.inference.api.main"

# --- runtime: the environment and a non-root user, nothing else.
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="tessera" \
      org.opencontainers.image.description="Federated LoRA fine-tuning of diffusion models: services, worker, CLI" \
      io.tessera.torch-variant="${TORCH_VARIANT}"
RUN groupadd --system --gid 10001 tessera \
    && useradd --system --uid 10001 --gid tessera --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tessera
COPY --from=build /opt/venv /opt/venv
# The root filesystem may be read-only (Kubernetes, compose): every cache points into /tmp,
# which both mount writable. The model and the text encoder load from site-packages or from
# TESSERA_BASE_MODEL; the offline flags make any attempt to reach a model hub fail at once.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
WORKDIR /tmp
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
# No default service: each deployment names its command, e.g.
#   uvicorn --factory services.aggregator.main:create_app --host 0.0.0.0 --port 8000
#   celery -A services.worker.app worker --queues aggregation --concurrency 1
#   tessera db upgrade
CMD ["tessera", "--help"]
