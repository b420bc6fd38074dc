#!/usr/bin/env bash
# Installs torchtitan 0.3.0, litgpt 0.5.13 and x-transformers 2.31.10 next to mst-fx, for
# tools/stack_bench.py and tests/third_party_stacks.py, with only what their model and loss code import.
#
#   python3 -m venv /work/stacks-venv && PYTHON=/work/stacks-venv/bin/python tools/stacks_install.sh
#
# Idempotent: every request is pinned, so a second run changes nothing. torch stays 2.13.0 (the
# CPU build this machine's index serves): every install is constrained to it, so no dependency can
# pull a CUDA torch.
set -euo pipefail
: "${PYTHON:?set PYTHON to the python of the venv to install into}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PIN="$(mktemp)"; trap 'rm -f "$PIN"' EXIT
echo "torch==2.13.0" > "$PIN"   # the constraint every install below gets
PIP=("$PYTHON" -m pip install -q -c "$PIN")

"${PIP[@]}" torch==2.13.0                   # first, so nothing else picks the torch build
"${PIP[@]}" -e "$ROOT[test]"                # mst-fx: the "mst" backend, tabulate, transformers
# torchtitan: --no-deps, as its own deps (datasets, tensorboard, wandb, torchdata, pillow,
# torch_checkpointing, einops) serve its data, logging and checkpointing, not the model or the loss.
"${PIP[@]}" --no-deps torchtitan==0.3.0
"${PIP[@]}" spmd_types==0.2.3               # imported by torchtitan.components.loss (torchtitan's exact pin)
"${PIP[@]}" tyro==1.0.17                    # imported by torchtitan.config.manager (+ docstring_parser, typeguard)
# triton: imported unconditionally (torchtitan/distributed/minimal_async_ep/kernels.py); installed
# into the venv it leaves CPU Inductor as it was (checked: torch.compile on CPU, inductor and mst).
"${PIP[@]}" triton==3.9.0
# litgpt: --no-deps, as it pins huggingface-hub<1.4, which would downgrade the hub under
# transformers 5.x (it needs >=1.31) and break `import transformers`.
"${PIP[@]}" --no-deps litgpt==0.5.13
# lightning: --no-deps, as its fsspec[http] and pytorch-lightning deps (aiohttp and 10 more) serve
# nothing litgpt's model, loss or Fabric use on one CPU.
"${PIP[@]}" --no-deps lightning==2.6.6
"${PIP[@]}" lightning-utilities==0.15.3 torchmetrics==1.9.0  # imported by `import lightning`
"${PIP[@]}" jsonargparse==4.41.0            # imported by litgpt/__init__ (its CLI)
# x-transformers: with its deps, each pinned: `import x_transformers` imports every one
# (torch-einops-utils also holds the cross_entropy its AutoregressiveWrapper trains with), and einx
# imports frozendict, numpy and sympy (the last two already here, from torch and transformers).
"${PIP[@]}" x-transformers==2.31.10 einops==0.8.2 einx==0.4.3 torch-einops-utils==0.2.0 loguru==0.7.3 \
    frozendict==2.5.1

# pip prints "ERROR: pip's dependency resolver ..." for the --no-deps packages' unmet requirements
# above (and `pip check` lists them): expected, the exit status is 0.
# Fails loudly if an import is still missing, or if pip moved torch off 2.13.0.
"$PYTHON" - <<'EOF'
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
import litgpt.model, litgpt.pretrain, litgpt.utils, lightning  # noqa: F401,E401
import torchtitan.components.loss, torchtitan.distributed.compile, torchtitan.models.llama3  # noqa: F401,E401
import x_transformers  # noqa: F401
print(f"stacks ok: torch {torch.__version__}")
EOF
