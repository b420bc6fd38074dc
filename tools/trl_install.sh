#!/usr/bin/env bash
# Creates (or updates) a venv with TRL next to mst-fx, for tools/trl_run.py.
#
#   bash tools/trl_install.sh                       # /work/trl-venv, trl 1.14.2
#   bash tools/trl_install.sh /work/trl-venv-116 1.16.0
#
# $1: the venv path (default /work/trl-venv); $2: the trl version (default 1.14.2).
#
# Why 1.14.2 by default: it is the last TRL release whose GRPO and DPO trainers compute the per-token
# log-probs from the model's full logits (model(...).logits -> logits[:, :-1, :] -> selective_log_softmax,
# a `for lg in logits` logsumexp loop), the graph the mst per-token-logps pass has to match. From 1.15.0
# on, both trainers patch the model's forward (`add_fused_lm_head`) and compute log-probs with TRL's own
# chunked autograd.Function (trl/kernels/chunked_logprob.py), never materialising the logits.
#
# Idempotent: every request is pinned, so a second run changes nothing. torch stays 2.13.0 (the CPU
# build this machine's index serves): every install is constrained to it, so no dependency can pull
# another torch. The other versions (transformers 5.24.0, datasets 5.2.0, accelerate 1.15.0, ...) are
# pinned to what the resolver picked on this machine, so the venv is reproducible.
set -euo pipefail
VENV="${1:-/work/trl-venv}"
TRL_VERSION="${2:-1.14.2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PIN="$(mktemp)"; trap 'rm -f "$PIN"' EXIT
echo "torch==2.13.0" > "$PIN"   # the constraint every install below gets

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q -c "$PIN")

"${PIP[@]}" torch==2.13.0                   # first, so nothing else picks the torch build
"${PIP[@]}" -e "$ROOT"                      # mst-fx: the "mst" backend (+ transformers, tabulate)
"${PIP[@]}" transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0
"${PIP[@]}" "trl==$TRL_VERSION" accelerate==1.15.0 datasets==5.2.0

# Fails loudly if an import is missing, or if pip moved torch off 2.13.0.
"$PY" - "$TRL_VERSION" <<'EOF'
import sys
import torch, transformers, trl, datasets, accelerate
from trl import GRPOConfig, GRPOTrainer, DPOConfig, DPOTrainer  # noqa: F401
import mst_fx  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert trl.__version__ == sys.argv[1], (trl.__version__, sys.argv[1])
print(f"trl venv ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, datasets {datasets.__version__}, accelerate {accelerate.__version__}")
EOF
