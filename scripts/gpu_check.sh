#!/usr/bin/env bash
# Every GPU claim of the toolkit in one call (under 8 minutes on one H100/H200), printed as a table:
#
#     scripts/gpu_check.sh [WHEEL_DIR] [gpu_check.py options...]     e.g. scripts/gpu_check.sh /wheels --json out.json
#
# WHEEL_DIR (or $WHEELS): a folder of wheels for an offline machine. What is missing is installed from it with
# `pip install --no-index --find-links WHEEL_DIR`: `datasets` (finetune's data pipeline needs it) and, when a
# deepspeed-*.whl is there, DeepSpeed. $DEEPSPEED_WHEEL names a DeepSpeed wheel file elsewhere. Without DeepSpeed its
# row reports "skipped". On a machine without a GPU every GPU-only row reports "skipped: no GPU" (tiny sizes).
# The logic is in scripts/gpu_check.py (python scripts/gpu_check.py --help); its exit code is 1 when a row failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
WHEELS="${WHEELS:-}"
if [ $# -gt 0 ] && [ -d "$1" ]; then
    WHEELS="$1"
    shift
fi

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
install() {  # install MODULE PIP_ARGS...: from the wheel folder, offline, when the module is missing
    local module="$1"
    shift
    have "$module" && return 0
    if [ -z "$WHEELS" ] && [ "$module" = datasets ]; then
        echo "gpu_check.sh: python module '$module' is missing and no WHEEL_DIR was given; its rows will fail" >&2
        return 0
    fi
    local find=()
    [ -n "$WHEELS" ] && find=(--find-links "$WHEELS")
    echo "gpu_check.sh: installing $module from ${WHEELS:-its wheel} (offline)" >&2
    "$PY" -m pip install --quiet --no-index "${find[@]}" "$@" >&2 ||
        echo "gpu_check.sh: could not install $module; its rows will fail or be skipped" >&2
}

install datasets datasets
if [ -n "${DEEPSPEED_WHEEL:-}" ]; then
    install deepspeed "$DEEPSPEED_WHEEL"
elif [ -n "$WHEELS" ] && compgen -G "$WHEELS/deepspeed-*.whl" >/dev/null; then
    install deepspeed deepspeed
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
