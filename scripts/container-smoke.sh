#!/usr/bin/env bash
# container-smoke.sh: build the image from this checkout, run it, and check that it serves.
#
# Usage: scripts/container-smoke.sh      (any directory; the build context is the repository root
#                                          that holds this script, so it works from a clean clone)
# Checks, in order: the image builds; the container answers GET /ready within SMOKE_READY_TIMEOUT;
# POST /api/chat returns a non-empty reply; `docker inspect` reports the container healthy within
# SMOKE_HEALTH_TIMEOUT; the container's user and its main process are not root. The container is
# always removed (trap). Exit status: 0 when every check passes, 1 otherwise. Timings and the image
# size are printed at the end.
#
# Settings (environment):
#   SMOKE_IMAGE           tag to build and run (seq2seq-chatbot:smoke)
#   SMOKE_SKIP_BUILD      1: test SMOKE_IMAGE as it is
#   SMOKE_NETWORK         bridge (default): publish container port 8000 on a random 127.0.0.1 port;
#                         host: --network host, with CHATBOT_PORT set to a free port
#   SMOKE_BUILD_NETWORK   docker build --network value; default: host when TORCH_FIND_LINKS is set
#                         (shared/container/engine.sh serves torch on 127.0.0.1), else Docker's default
#   TORCH_FIND_LINKS      passed as a build arg when set (see the Dockerfile)
#   SMOKE_READY_TIMEOUT   seconds (180); SMOKE_HEALTH_TIMEOUT seconds (120); SMOKE_BUILD_TIMEOUT (1800)
#   SMOKE_DOCKER_ARGS     extra `docker run` arguments, split on spaces (e.g. "-e CHATBOT_CHECKPOINT=...")
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${SMOKE_IMAGE:-seq2seq-chatbot:smoke}
NETWORK=${SMOKE_NETWORK:-bridge}
READY_TIMEOUT=${SMOKE_READY_TIMEOUT:-180}
HEALTH_TIMEOUT=${SMOKE_HEALTH_TIMEOUT:-120}
BUILD_TIMEOUT=${SMOKE_BUILD_TIMEOUT:-1800}
NAME=chatbot-smoke-$$-$RANDOM
T0=$(date +%s)

say() { printf 'container-smoke: [%4ds] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
now() { date +%s.%N; }
since() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.1f}")' "$1" "$(now)"; }

cleanup() {
  local rc=$?
  if docker container inspect "$NAME" >/dev/null 2>&1; then
    if [ "$rc" -ne 0 ]; then
      say "container logs (last 60 lines):"
      docker logs --tail 60 "$NAME" 2>&1 | sed 's/^/    /' >&2 || true
    fi
    docker rm -f "$NAME" >/dev/null 2>&1 || say "warning: could not remove container $NAME"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP

# http METHOD URL [JSON]: print the body; exit status 0 for a 2xx answer, 14 for 4xx, 15 for 5xx, 3
# when nothing answers. python3 rather than curl, which a fresh machine may lack.
http() {
  python3 - "$@" <<'EOF'
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=30) as r:
        sys.stdout.write(r.read().decode("utf-8", "replace"))
except urllib.error.HTTPError as e:
    sys.stdout.write(e.read().decode("utf-8", "replace"))
    sys.exit(10 + e.code // 100)
except OSError as e:
    sys.stdout.write(str(e))
    sys.exit(3)
EOF
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

command -v docker >/dev/null || fail "docker is not on PATH"
command -v python3 >/dev/null || fail "python3 is not on PATH"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || fail "no Docker engine answers (on machines without one: ENV=\$(shared/container/engine.sh) && eval \"\$ENV\")"
[ -f "$ROOT/model/pretrained/chitchat/model.safetensors" ] \
  || fail "$ROOT/model/pretrained/chitchat has no model.safetensors: the image ships that model"

# ---- build ------------------------------------------------------------------------------------
build_s=skipped
if [ "${SMOKE_SKIP_BUILD:-0}" != 1 ]; then
  build=(docker build -t "$IMAGE")
  build_network=${SMOKE_BUILD_NETWORK:-}
  if [ -n "${TORCH_FIND_LINKS:-}" ]; then
    build+=(--build-arg "TORCH_FIND_LINKS=$TORCH_FIND_LINKS")
    build_network=${build_network:-host}
  fi
  [ -z "$build_network" ] || build+=(--network "$build_network")
  say "building: ${build[*]} $ROOT"
  t=$(now)
  timeout "$BUILD_TIMEOUT" "${build[@]}" "$ROOT" >&2 || fail "docker build failed"
  build_s=$(since "$t")
  say "built $IMAGE in ${build_s}s"
fi
size_bytes=$(docker image inspect -f '{{.Size}}' "$IMAGE") || fail "no image $IMAGE"
size_mb=$((size_bytes / 1000000))

# ---- run --------------------------------------------------------------------------------------
run=(docker run -d --name "$NAME")
case "$NETWORK" in
  bridge) run+=(-p 127.0.0.1::8000) ;;
  host) port=$(free_port); run+=(--network host -e "CHATBOT_PORT=$port") ;;
  *) fail "SMOKE_NETWORK must be bridge or host, not $NETWORK" ;;
esac
# shellcheck disable=SC2206  # split on purpose
[ -z "${SMOKE_DOCKER_ARGS:-}" ] || run+=($SMOKE_DOCKER_ARGS)
say "running: ${run[*]} $IMAGE"
t_start=$(now)
"${run[@]}" "$IMAGE" >/dev/null || fail "docker run failed"
if [ "$NETWORK" = bridge ]; then
  mapping=$(docker port "$NAME" 8000/tcp | head -n1) || fail "no published port"
  port=${mapping##*:}
fi
BASE=http://127.0.0.1:$port
say "container $NAME, server at $BASE"

running() { [ "$(docker inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" = true ]; }

deadline=$(($(date +%s) + READY_TIMEOUT))
until body=$(http GET "$BASE/ready" 2>/dev/null); do
  running || fail "the container exited (status $(docker inspect -f '{{.State.ExitCode}}' "$NAME")) before /ready"
  [ "$(date +%s)" -lt "$deadline" ] || fail "/ready did not answer 200 within ${READY_TIMEOUT}s (last: ${body:-none})"
  sleep 0.5
done
ready_s=$(since "$t_start")
say "ready after ${ready_s}s: $body"

http GET "$BASE/health" >/dev/null || fail "GET /health did not answer 200"

# ---- chat -------------------------------------------------------------------------------------
t=$(now)
answer=$(http POST "$BASE/api/chat" '{"message": "hello, how are you?"}') \
  || fail "POST /api/chat failed: $answer"
chat_s=$(since "$t")
reply=$(python3 -c '
import json, sys
body = json.loads(sys.argv[1])
reply = body.get("reply")
if not isinstance(reply, str) or not reply.strip():
    sys.exit("no non-empty reply in " + sys.argv[1])
print(reply)' "$answer") || fail "bad chat answer: $answer"
say "chat reply in ${chat_s}s: $reply"

# A malformed request must be a clean 4xx from inside the container, not a crash.
rc=0
bad=$(http POST "$BASE/api/chat" '{"nope": 1}') || rc=$?
[ "$rc" = 14 ] || fail "a request without message got no 4xx (exit $rc): $bad"

# ---- health status and user -------------------------------------------------------------------
deadline=$(($(date +%s) + HEALTH_TIMEOUT))
while :; do
  health=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$NAME")
  case "$health" in
    healthy) break ;;
    none) fail "the image has no HEALTHCHECK" ;;
    unhealthy) fail "health status is unhealthy: $(docker inspect -f '{{json .State.Health.Log}}' "$NAME")" ;;
  esac
  running || fail "the container exited while waiting for the health status"
  [ "$(date +%s)" -lt "$deadline" ] || fail "health status still '$health' after ${HEALTH_TIMEOUT}s"
  sleep 1
done
healthy_s=$(since "$t_start")
say "health status healthy after ${healthy_s}s"

user=$(docker inspect -f '{{.Config.User}}' "$NAME")
case "${user%%:*}" in
  "" | 0 | root) fail "the image runs as root (Config.User='$user')" ;;
esac
uid=$(docker exec "$NAME" id -u) || fail "docker exec id -u failed"
[ "$uid" != 0 ] || fail "docker exec runs as uid 0"
pid1_uid=$(docker exec "$NAME" sh -c "awk '/^Uid:/ {print \$2}' /proc/1/status") || fail "cannot read /proc/1/status"
[ "$pid1_uid" != 0 ] || fail "the server process (pid 1) runs as root"
say "user $user: exec uid $uid, server process uid $pid1_uid"

say "PASSED"
printf 'image %s: %s MB; build %ss; ready %ss after docker run; healthy %ss; first chat %ss\n' \
  "$IMAGE" "$size_mb" "$build_s" "$ready_s" "$healthy_s" "$chat_s"
