#!/usr/bin/env bash
# LoRA Studio standalone: set up .venv on first use (or when requirements change), then
#   ./launch.sh [--model PATH] [--lora-dir DIR] [--port N] [--listen]   start the app (embedded model by default)
#   ./launch.sh test [pytest args]                                      run the test suite
#   ./launch.sh cli ARGS...                                             python -m lib_lora ARGS (info, generate, train, ...)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON_BIN=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False

mode=app
if [[ ${1:-} == test ]]; then mode=test; shift; elif [[ ${1:-} == cli ]]; then mode=cli; shift; fi

stamp_of() { cat "$@" launch.sh | sha256sum | cut -c1-16; }

ensure_venv() {
  if [[ ! -x "$PY" ]]; then
    echo "[launch] creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  local want; want=$(stamp_of requirements.txt pyproject.toml)
  if [[ ! -f "$VENV/.stamp-app" || $(cat "$VENV/.stamp-app") != "$want" ]]; then
    echo "[launch] installing torch==2.13.0 and requirements.txt (first run takes a few minutes)"
    # torch first and pinned: anything that admits a newer torch would pull the CUDA stack.
    "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q -r requirements.txt "torch==2.13.0"
    # lib_lora importable from any folder (`python -m lib_lora`, `accelerate launch -m lib_lora train ...`)
    "$PY" -m pip install -q --no-deps -e .
    echo "$want" > "$VENV/.stamp-app"
  fi
}

ensure_test_deps() {
  local want; want=$(stamp_of requirements.txt requirements-test.txt)
  if [[ ! -f "$VENV/.stamp-test" || $(cat "$VENV/.stamp-test") != "$want" ]]; then
    echo "[launch] installing test requirements"
    "$PY" -m pip install -q -r requirements-test.txt "torch==2.13.0"
    # The LDM code the web UI runs, for host-family tests; its declared dependencies would replace torch.
    "$PY" -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5"
    echo "$want" > "$VENV/.stamp-test"
  fi
  if ! command -v chromium >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[launch] installing Debian chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[launch] could not install chromium; browser tests will say so"
  fi
}

ensure_venv
case "$mode" in
  test)
    ensure_test_deps
    exec "$PY" -m pytest tests "$@"
    ;;
  cli)
    exec "$PY" -m lib_lora "$@"
    ;;
  app)
    exec "$PY" -m lib_lora.app "$@"
    ;;
esac
