# One image for every tokenrelay process: api, worker, ui, status, serve.
#
# CPU torch by default (a ~1 GB image):
#   docker build -t tokenrelay:cpu .
# CUDA torch (the wheels bring their CUDA libraries; the host needs the NVIDIA driver and
# the NVIDIA Container Toolkit):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t tokenrelay:cuda .
#
# Every flag of every command also comes from TOKENRELAY_<FLAG> (README, Operations).
ARG PYTHON_VERSION=3.11

# --- build: a virtual environment with torch and tokenrelay, compiled nowhere else --------
FROM python:${PYTHON_VERSION}-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# torch first, from its own index: `pip install .` then finds it satisfied instead of
# pulling the multi-GB CUDA build from PyPI.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch --index-url "${TORCH_INDEX}"

# Only what the package needs, so edits to docs or tests do not invalidate this layer.
COPY pyproject.toml README.md /src/
COPY tokenrelay/ /src/tokenrelay/
COPY api/ /src/api/
COPY workers/ /src/workers/
COPY queueing/ /src/queueing/
COPY ui/ /src/ui/
RUN pip install /src \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# --- runtime: the venv on a clean slim base, run as an unprivileged user -----------------
FROM python:${PYTHON_VERSION}-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    TOKENRELAY_LOG_FORMAT=json

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin tokenrelay
COPY --from=build /opt/venv /opt/venv
USER tokenrelay
WORKDIR /home/tokenrelay

EXPOSE 8000 7860
# Everything in one container (embedded Redis, the demo model fetched on first start).
# docker-compose.yml runs the parts as separate services instead.
CMD ["tokenrelay", "serve", "--host", "0.0.0.0"]
