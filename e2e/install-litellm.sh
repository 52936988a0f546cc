#!/usr/bin/env bash
# Installs the pinned LiteLLM proxy (e2e/litellm-requirements.lock) into its own venv, e2e/.venv-litellm.
# Separate from the project venv because litellm[proxy] pins versions (pydantic, openai, ...) that must not
# leak into the operator's dependency set. Idempotent: a venv whose stamp matches the lock's hash is kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
lock="$here/litellm-requirements.lock"
venv="${KAOS_LITELLM_VENV:-$here/.venv-litellm}"
uv="${UV:-$root/.venv/bin/uv}"
stamp="$venv/.kaos-lock-sha256"
[[ -x "$uv" ]] || { echo "install-litellm: uv not found at $uv (set UV=...)" >&2; exit 1; }

want="$(sha256sum "$lock" | cut -d' ' -f1)"
if [[ -x "$venv/bin/litellm" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "litellm venv up to date: $venv"
    exit 0
fi

# Only the machine's own Python 3.11 (the lock is compiled for it); never a downloaded interpreter.
UV_PYTHON_DOWNLOADS=never "$uv" venv --quiet --allow-existing --python 3.11 "$venv"
# pip sync removes anything not in the lock, so a reused venv ends with exactly the locked set.
"$uv" pip sync --quiet --python "$venv/bin/python" "$lock"
LITELLM_LOCAL_MODEL_COST_MAP=True "$venv/bin/python" -c "import litellm" >/dev/null
echo "$want" >"$stamp"
echo "installed litellm venv: $venv"
