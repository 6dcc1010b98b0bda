# One image for every tokenrelay process: api, worker, serve, chat.
# CPU torch by default; for CUDA workers build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

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
RUN pip install /src && rm -rf /src

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin tokenrelay
USER tokenrelay
WORKDIR /home/tokenrelay

EXPOSE 8000
# Everything in one container (embedded Redis, the demo model fetched on first start).
# docker-compose.yml runs the parts as separate services instead.
CMD ["tokenrelay", "serve", "--host", "0.0.0.0"]
