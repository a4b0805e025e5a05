#!/usr/bin/env bash
# The test suite on the CPU with the library versions of the GPU machine the device tool lends (Python 3.12,
# torch 2.11, transformers 5.17; DeepSpeed and TRL as pyproject.toml allows / pins them), in a venv of its own, so that
# a version difference shows here rather than in a short GPU lease. Not part of `make test`: it installs torch
# 2.11's CUDA build from PyPI (about 5 GB with its NVIDIA libraries; it runs on a CPU) and takes ~15 minutes.
#
#   scripts/compat_test.sh [pytest args...]         # default: the whole suite
#   scripts/compat_test.sh tests/test_fastpath.py -x
#
# Environment: COMPAT_VENV (default /tmp/rlhf-compat-venv; reused when present, its packages brought up to
# pyproject.toml's requirements), COMPAT_PYTHON (the
# interpreter to build it with; default python3.12 on PATH, else pyenv's 3.12), TORCH_VERSION (2.11.0),
# TRANSFORMERS_VERSION (5.17.0). The repository is imported from this checkout (PYTHONPATH), not installed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${COMPAT_VENV:-/tmp/rlhf-compat-venv}
torch_pin="torch==${TORCH_VERSION:-2.11.0}"
if [[ ! -x "$venv/bin/python" ]]; then
    py=${COMPAT_PYTHON:-}
    if [[ -z "$py" ]]; then  # the first that runs (a pyenv shim of a version not selected does not)
        for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
            if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2> /dev/null; then
                py=$c
                break
            fi
        done
    fi
    if [[ -z "$py" ]]; then
        echo "compat_test.sh: no Python 3.12 found; set COMPAT_PYTHON" >&2
        exit 2
    fi
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q "$torch_pin"
fi
# every time, also into a venv kept from before: pyproject.toml's requirements may have changed since (a venv built
# before pytest was pinned below 9.2 kept pytest 9.2, under which the suite's xdist groups do not take)
"$venv/bin/pip" install -q "$torch_pin" "transformers==${TRANSFORMERS_VERSION:-5.17.0}" "$root[dev,bench]"
"$venv/bin/pip" uninstall -q -y rlhf  # imported from the checkout instead
"$venv/bin/python" -c "import sys, torch, transformers, deepspeed; print('compat:', sys.version.split()[0], 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
cd "$root"
export PATH="$venv/bin:$PATH" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cpu
exec python -m pytest "${@:-tests}"
