#!/usr/bin/env bash
# Every CUDA path of ai-server in one command (issue 28): scripts/gpu_check.py's checks, each timed, in a process
# of its own; a JSON report and a summary. On the lent GPU machine (no network, its own torch and transformers)
# the wheels its image lacks come from .gpu-wheelhouse/ (made here beforehand by scripts/gpu_wheelhouse.sh, carried
# with the tree) and are installed beside, never over, its torch.
#   scripts/gpu_check.sh                 the real run (needs CUDA)
#   scripts/gpu_check.sh --cpu           the rehearsal on CPU (CUDA-only checks skipped, saying so)
#   scripts/gpu_check.sh --only transformers,vision --json /tmp/r.json
# PYTHON picks the interpreter (default python3); GPU_WHEELHOUSE the wheel folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELHOUSE:-.gpu-wheelhouse}
case " $* " in *" --cpu "*) rehearsal=1 ;; *) rehearsal="" ;; esac  # the rehearsal uses this machine's packages
if [ -z "$rehearsal" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  target=${TMPDIR:-/tmp}/ai-server-gpu-site
  echo "gpu_check: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $target (no index, no deps)"
  "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$target" "$WHEELS"/*.whl
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" scripts/gpu_check.py "$@"
