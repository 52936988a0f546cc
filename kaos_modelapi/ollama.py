"""What a Hosted-mode pod runs: the pinned Ollama release and the init script that pulls the model."""

from __future__ import annotations

from typing import Final

OLLAMA_VERSION: Final = "0.12.6"
DEFAULT_IMAGE: Final = f"docker.io/ollama/ollama:{OLLAMA_VERSION}"

PORT: Final = 11434
# Where the model volume (an emptyDir, or the ModelAPI's model store) is mounted, in the pull-model init
# container and in the serving container. The official image runs as root with its state under
# /root/.ollama, which no other user may reach; the pods run as a non-root user instead (the `restricted`
# Pod Security Standard) with HOME here, so Ollama's key pair goes under .ollama/, and the models under
# models/ (OLLAMA_MODELS), where the image kept them in its state root: a model store written by an
# earlier root pod keeps its models.
DATA_DIR: Final = "/var/lib/ollama"
MODELS_DIR: Final = f"{DATA_DIR}/models"
VOLUME_NAME: Final = "ollama-data"
PULL_CONTAINER: Final = "pull-model"

# GET / answers "Ollama is running" as soon as the server listens: liveness.
LIVENESS_PATH: Final = "/"

# Readiness means the configured model is present and loaded into memory, so a client's first request does
# not pay the load. `ollama show` reads the local store only (a missing model fails it; `ollama run` would
# pull a missing one); `ollama run` without a prompt (stdin empty) sends a generate request without a
# prompt, which loads the model, sets its keep-alive (-1: until the server stops) and returns once it is
# loaded (a model that cannot load fails it). Each probe repeats it: a model unloaded meanwhile (a client's
# keep_alive: 0) is loaded again, and the pod is not Ready until it is. A loaded model makes it a no-op.
READY_SCRIPT: Final = """\
ollama show "$OLLAMA_MODEL" >/dev/null || exit 1
err=$(ollama run --keepalive=-1s "$OLLAMA_MODEL" </dev/null 2>&1 >/dev/null) || { echo "$err" >&2; exit 1; }
"""
READY_PERIOD_SECONDS: Final = 5
# The first probe loads the model: as long as the largest model takes to load from disk.
READY_TIMEOUT_SECONDS: Final = 300

ENV_MODEL: Final = "OLLAMA_MODEL"
ENV_START_TIMEOUT: Final = "KAOS_OLLAMA_START_TIMEOUT"

# `ollama pull` redraws one progress bar per layer ten times a second with terminal escapes, even when its
# output is a log: this awk program (mawk and gawk both run it) turns that into lines, each text once and
# one line per percent of the largest layer (the weights), in the form PROGRESS_PREFIX + "42% 57 MB/135 MB"
# (Ollama's own percent and sizes). The operator reads the last such line for the status message.
PROGRESS_PREFIX: Final = "pull-model: progress "
PROGRESS_AWK: Final = r"""
BEGIN { RS = "\033" }
{
  sub(/^\[[0-9;?]*[A-Za-z]/, "")
  n = split($0, lines, "\n")
  for (i = 1; i <= n; i++) show(lines[i])
}
function show(s,   f, t, sizes, total) {
  if (s ~ /^pulling [^ ]+: +[0-9]+% /) {
    split(s, f, " ")
    split(s, t, "\342\226\217")
    if (match(t[2], /[0-9.]+ [KMGT]?B\/[0-9.]+ [KMGT]?B/)) sizes = substr(t[2], RSTART, RLENGTH)
    else if (match(t[2], /[0-9.]+ [KMGT]?B/)) sizes = substr(t[2], RSTART, RLENGTH) "/" substr(t[2], RSTART, RLENGTH)
    else return
    total = sizes; sub(/.*\//, "", total)
    if (top == "" || bytes(total) > most) { top = f[2]; most = bytes(total) }
    if (f[2] == top && f[3] != shown) { shown = f[3]; print "pull-model: progress " f[3] " " sizes; fflush() }
    return
  }
  sub(/[ \t]+$/, "", s)
  sub(/ [^ -~]+$/, "", s)
  if (s != "" && !(s in seen)) { seen[s] = 1; print s; fflush() }
}
function bytes(h,   x) {
  split(h, x, " ")
  return x[1] * (x[2] == "KB" ? 1e3 : x[2] == "MB" ? 1e6 : x[2] == "GB" ? 1e9 : x[2] == "TB" ? 1e12 : 1)
}
"""

# Run as `/bin/sh -c PULL_SCRIPT` in the init container. The model name arrives only as $OLLAMA_MODEL and
# is only ever expanded inside double quotes, so no character of it is parsed as shell syntax.
# Polls the server (1 s apart) until it answers or the deadline passes; the exit status is the pull's (the
# shell has no pipefail: it comes back through fd 4 around the pipe into the progress filter, which is
# plain `cat` in an image without awk).
_PULL_SCRIPT = """\
set -u
: "${OLLAMA_MODEL:?OLLAMA_MODEL is not set}"
timeout="${KAOS_OLLAMA_START_TIMEOUT:-120}"
ollama serve &
server=$!
stop() { kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; }
trap stop EXIT
trap 'exit 143' TERM INT
deadline=$(( $(date +%s) + timeout ))
until ollama list >/dev/null 2>&1; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "pull-model: ollama serve exited before it answered" >&2
    exit 1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "pull-model: ollama did not answer within ${timeout}s" >&2
    exit 1
  fi
  sleep 1
done
progress() { if command -v awk >/dev/null 2>&1; then awk '@PROGRESS_AWK@'; else cat; fi; }
printf 'pull-model: pulling %s\\n' "$OLLAMA_MODEL"
exec 3>&1
code=$( { { ollama pull "$OLLAMA_MODEL" 2>&1; echo "$?" >&4; } | progress >&3; } 4>&1 )
if [ "$code" != 0 ]; then
  printf 'pull-model: pulling %s failed\\n' "$OLLAMA_MODEL" >&2
  exit 1
fi
printf 'pull-model: pulled %s\\n' "$OLLAMA_MODEL"
"""
assert "'" not in PROGRESS_AWK  # it is quoted with single quotes in the script
PULL_SCRIPT: Final = _PULL_SCRIPT.replace("@PROGRESS_AWK@", PROGRESS_AWK)
