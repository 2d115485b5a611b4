# Container image for the seq2seq chatbot: `chatbot serve` on port 8000, with the shipped model inside.
#
#   docker build -t seq2seq-chatbot .
#   docker run --rm -p 8000:8000 seq2seq-chatbot
#
# Two stages: `build` makes a virtual environment in /opt/venv (CPU torch, the other dependencies, then
# this package, whose wheel carries model/pretrained/chitchat); `runtime` is a fresh base image that
# gets only that venv, so pip, build tools and caches stay behind. See docs/CONTAINER.md.
#
# torch comes from the CPU index by default (an unpinned torch from PyPI would pull a multi-gigabyte
# CUDA build). Machines without that index pass a folder or URL of wheels instead:
#   docker build --network host --build-arg TORCH_FIND_LINKS=http://127.0.0.1:39517/ -t seq2seq-chatbot .

FROM python:3.11-slim AS build

# python3 is /usr/local/bin in the official image and /usr/bin in some stand-ins: a venv works with both.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is most of the image and changes least often.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
RUN if [ -n "$TORCH_FIND_LINKS" ]; then \
      pip install --no-cache-dir --find-links "$TORCH_FIND_LINKS" "torch==$TORCH_VERSION"; \
    else pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"; fi

WORKDIR /src

# The other dependencies, read from pyproject.toml, so that a change to the code alone does not
# reinstall them. constraints.txt pins torch to the version installed above (2.13.0 matches 2.13.0+cpu).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt

# The package itself, with the shipped checkpoint as package data. README.md* may match nothing
# (setuptools then only warns); pyproject.toml is named again so the COPY always has a source.
COPY pyproject.toml README.md* ./
COPY model/ model/
COPY app/ app/
RUN test -f model/pretrained/chitchat/model.safetensors \
      || { echo "model/pretrained/chitchat/model.safetensors is missing: no shipped model to build in" >&2; exit 1; } \
    && pip install --no-cache-dir -c constraints.txt .

# Trim what torch ships for building and testing C++ code, never used at run time: C++ test
# binaries (torch/test, torch/bin/*Test, test_*), headers (torch/include) and protoc: about 160 MB.
# Then prove the result still works: import torch and load the shipped checkpoint from the
# installed package (-P: not from /src).
RUN torch_dir=$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torch').origin))") \
    && rm -rf "$torch_dir/test" "$torch_dir/include" "$torch_dir"/bin/protoc* "$torch_dir"/bin/*Test "$torch_dir"/bin/test_* \
    && python -P -c "from model.checkpoint import load_checkpoint, shipped_checkpoint_path as p; print(load_checkpoint(p()).name)"


FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="seq2seq-chatbot" \
      org.opencontainers.image.description="LSTM seq2seq chatbot: FastAPI server (REST, OpenAI-compatible, chat page) and training" \
      org.opencontainers.image.licenses="MIT"

# A fixed, non-root uid/gid (10001), so that bind-mounted folders can be chowned to it and
# Kubernetes' runAsNonRoot can check it. /data is where compose mounts the checkpoint volume; a
# new named volume copies this folder's owner, so the user can write trained models there.
RUN groupadd --gid 10001 chatbot \
    && useradd --uid 10001 --gid chatbot --home-dir /home/chatbot --create-home \
       --shell /usr/sbin/nologin chatbot \
    && mkdir -p /data/checkpoints \
    && chown -R chatbot:chatbot /data

COPY --from=build /opt/venv /opt/venv
# Training configs, for `chatbot train --config /opt/chatbot/configs/chitchat.toml` (compose's train service).
COPY configs/ /opt/chatbot/configs/

# Settings are CHATBOT_* variables (see DESIGN: CHECKPOINT, HOST, PORT, API_KEY, CORS_ORIGINS,
# MAX_BATCH_SIZE, MAX_QUEUE, REQUEST_TIMEOUT_S, MAX_INPUT_CHARS, NUM_THREADS, ...). CHATBOT_CHECKPOINT
# is left unset: the server then loads the shipped model; point it at /data/checkpoints/NAME to serve
# your own. The healthcheck reads CHATBOT_PORT too, so changing the port keeps it right.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHATBOT_HOST=0.0.0.0 \
    CHATBOT_PORT=8000

USER 10001:10001
WORKDIR /home/chatbot
EXPOSE 8000

# /ready answers 200 once the model is loaded and the engine runs; urllib raises (exit 1) on
# anything else. The start period is generous (a loaded 2-core machine took ~2 min to load torch and
# a model): failures in it do not count, and the first success marks the container healthy at once. Python rather than curl: the slim image has no curl and needs none.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CHATBOT_PORT', '8000') + '/ready', timeout=4)"]

# Listen on all interfaces (inside a container 127.0.0.1 is unreachable from outside); the port
# comes from CHATBOT_PORT.
CMD ["chatbot", "serve", "--host", "0.0.0.0"]
