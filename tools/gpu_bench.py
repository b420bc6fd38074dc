"""CUDA benchmark: Inductor against mst (and Liger-Kernel / Cut Cross-Entropy when importable),
all in one process, on three cases:

    lm-head        LM head + cross-entropy alone, bf16: x 32768 x 4096, W 128256 x 4096, one label
                   in 7 ignored; loss = F.cross_entropy(F.linear(x, W).float(), y, ignore_index=-100).
                   Variants: inductor, mst, mst-param (grad_accumulation="param"), liger
                   (LigerFusedLinearCrossEntropyLoss), cce (Apple's cut_cross_entropy.linear_cross_entropy);
                   the peers run eagerly.
    llama-1b       Hugging Face LlamaForCausalLM from a LlamaConfig (no download, random weights, bf16,
                   sdpa): hidden 2048, intermediate 8192, vocab 128256, 4 layers, 32 heads, 8 kv heads,
                   tied embeddings; one batch of 1 x 16384 tokens, labels = input ids. inductor and mst.
    llama-1b-ckpt  the same with gradient checkpointing (use_reentrant=False) in train mode.

How: the process's one-off costs are paid first on a throwaway compiled function; then per
variant, --warmup steps, the first of which compiles (from an empty Inductor and Triton cache of its
own with --cold; its wall time is "first step s"), then --steps measured steps
(forward + backward, grads set to None between steps); step ms is their median, timed with
torch.cuda.synchronize(). Peak is torch.cuda.max_memory_allocated() over a measured step (reset
right before it) minus torch.cuda.memory_allocated() before it, the highest over the measured steps;
for lm-head the gradients of x and W are subtracted too: "peak above the inputs and their
gradients". Between variants: torch._dynamo.reset(), the model deleted, gc.collect(),
torch.cuda.empty_cache(). A variant that runs out of memory or fails is reported as such, with its
error's first line; a peer that isn't installed is listed as "not installed". Each variant's loss
is compared with Inductor's. --smoke runs the same code on CPU at tiny sizes in fp32, with no
memory figures (CUDA's counters don't exist there); without CUDA and without --smoke it exits 2.

    python tools/gpu_bench.py                          # all cases; sized for 6 minutes on one H100
    python tools/gpu_bench.py --case lm-head --steps 5 --json /tmp/gpu_bench.json
    python tools/gpu_bench.py --smoke                  # the same code paths on CPU at tiny sizes

On a GPU machine without internet: carry the repository with its git-ignored `wheels/` folder
(`pip download --no-deps -d wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1`), then there

    python3 -m pip install --no-index --no-deps --no-build-isolation .
    python3 -m pip install --no-index --no-deps wheels/*.whl
    python3 tools/gpu_bench.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate

CASES = ("lm-head", "llama-1b", "llama-1b-ckpt")
# mst-param on the LM head only: two more 1B-model compiles would not fit the 6-minute budget.
VARIANTS = {"lm-head": ("inductor", "mst", "mst-param", "liger", "cce"), "llama": ("inductor", "mst")}
STARTED = time.perf_counter()
PEER_MODULES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}

# Full sizes (one H100) and the --smoke ones (CPU, fp32).
SIZES = {
    "full": {
        "head": {"tokens": 32768, "hidden": 4096, "vocab": 128256},
        "llama": {"tokens": 16384, "hidden": 2048, "intermediate": 8192, "vocab": 128256, "layers": 4,
                  "heads": 32, "kv_heads": 8},
    },
    "smoke": {
        "head": {"tokens": 512, "hidden": 64, "vocab": 1000},
        "llama": {"tokens": 256, "hidden": 64, "intermediate": 256, "vocab": 1000, "layers": 2,
                  "heads": 4, "kv_heads": 2},
    },
}  # fmt: skip


@dataclasses.dataclass
class Result:
    case: str
    variant: str
    status: str = "ok"  # ok | OOM | failed: <line> | not installed
    peak_mib: float | None = None  # None where not measured (CPU)
    step_ms: float | None = None
    first_step_s: float | None = None
    loss: float | None = None
    tokens: int = 0


@dataclasses.dataclass
class Prepared:
    step: Callable[[], torch.Tensor]  # forward + backward, returns the loss
    params: list[torch.Tensor]  # whose .grad is set to None between steps
    subtract_bytes: int = 0  # taken off the peak besides what was allocated before the step


class NotInstalled(Exception):
    pass


# ---------------------------------------------------------------- the cases


def mst_backend(variant: str):
    """"mst" through the package's entry point (mst_fx.backend() when it isn't registered);
    "mst-param": with grad_accumulation="param", the weight gradients summed in place in bf16."""
    import mst_fx

    if variant == "mst-param":
        return mst_fx.backend(grad_accumulation="param")
    return "mst" if "mst" in torch._dynamo.list_backends() else mst_fx.backend()


def head_loss(x, weight, target):
    return F.cross_entropy(F.linear(x, weight).float(), target, ignore_index=-100)


def head_loss_fn(variant: str):
    if variant == "inductor":
        return torch.compile(head_loss)
    if variant.startswith("mst"):
        return torch.compile(head_loss, backend=mst_backend(variant))
    if importlib.util.find_spec(PEER_MODULES[variant]) is None:
        raise NotInstalled
    if variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda x, weight, target: liger(weight, x, target)  # forward(lin_weight, _input, target)
    from cut_cross_entropy import linear_cross_entropy  # (e, c, targets, ignore_index=-100, ...)

    return lambda x, weight, target: linear_cross_entropy(x, weight, target, ignore_index=-100)


def prepare_lm_head(variant: str, size: dict, device: str, dtype: torch.dtype) -> Prepared:
    loss_fn = head_loss_fn(variant)
    tokens, hidden, vocab = size["tokens"], size["hidden"], size["vocab"]
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden, device=device, dtype=dtype) / math.sqrt(hidden)).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[torch.rand(tokens, device=device) < 1 / 7] = -100

    def step():
        loss = loss_fn(x, weight, target)
        loss.backward()
        return loss

    grads = (x.numel() + weight.numel()) * x.element_size()
    return Prepared(step, [x, weight], subtract_bytes=grads)


def prepare_llama(variant: str, size: dict, device: str, dtype: torch.dtype, checkpointing: bool) -> Prepared:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=size["hidden"], intermediate_size=size["intermediate"], vocab_size=size["vocab"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=size["tokens"], tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    compiled = torch.compile(model) if variant == "inductor" else torch.compile(model, backend=mst_backend(variant))
    ids = torch.randint(0, size["vocab"], (1, size["tokens"]), device=device)

    def step():
        loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss

    return Prepared(step, list(model.parameters()))


# ---------------------------------------------------------------- measuring


def measure(prepared: Prepared, steps: int, warmup: int, cuda: bool) -> tuple[float, float, float | None, float]:
    """(first step s, median step ms, peak MiB or None on CPU, last loss)."""

    def run() -> float:
        loss = prepared.step().item()  # .item() waits for the step
        if cuda:
            torch.cuda.synchronize()
        for p in prepared.params:
            p.grad = None
        return loss

    start = time.perf_counter()
    run()
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        run()
    times, peaks = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - start)
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated() - before - prepared.subtract_bytes)
    peak = max(peaks) / 2**20 if cuda else None
    return first_s, statistics.median(times) * 1e3, peak, loss


def run_variant(case: str, variant: str, args) -> Result:
    cuda = args.device.startswith("cuda")
    sizes = SIZES["smoke" if args.smoke else "full"]
    size = dict(sizes["head" if case == "lm-head" else "llama"])
    size["tokens"] = args.tokens or size["tokens"]
    result = Result(case, variant, tokens=size["tokens"])
    print(f"{case}: {variant} ... ({time.perf_counter() - STARTED:.0f} s so far)", file=sys.stderr, flush=True)
    with fresh_cache() if args.cold else contextlib.nullcontext():
        _run(result, case, variant, size, args, cuda)
    return result


def _run(result: Result, case: str, variant: str, size: dict, args, cuda: bool) -> None:
    prepared = None
    try:
        if case == "lm-head":
            prepared = prepare_lm_head(variant, size, args.device, args.dtype)
        else:
            prepared = prepare_llama(variant, size, args.device, args.dtype, checkpointing=case == "llama-1b-ckpt")
        result.first_step_s, result.step_ms, result.peak_mib, result.loss = measure(
            prepared, args.steps, args.warmup, cuda
        )
    except NotInstalled:
        result.status = "not installed"
    except torch.cuda.OutOfMemoryError:
        result.status = "OOM"
    except Exception as error:  # noqa: BLE001 - any failure becomes a row, the run goes on
        result.status = f"failed: {one_line(error)}"
    finally:
        del prepared
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def warm_process(device: str) -> None:
    """Pays the process's one-off costs (Inductor's import and compile workers, CUDA context, cuBLAS)
    on a throwaway function, so that they don't land in the first variant's first step."""
    with fresh_cache():
        x = torch.randn(64, 64, device=device, requires_grad=True)
        torch.compile(lambda x: (x @ x).relu().sum())(x).backward()
        torch._dynamo.reset()


def fresh_cache():
    """An empty Inductor (and Triton) cache for one variant, so its first step is a cold compile."""
    import torch._inductor.utils as inductor_utils

    return (getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache)()


def one_line(error: BaseException) -> str:
    """The error's type and first line; a backend's own error rather than Dynamo's wrapper of it."""
    error = getattr(error, "inner_exception", None) or error  # BackendCompilerFailed
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


# ---------------------------------------------------------------- output


def table(results: list[Result]) -> str:
    base = next((r for r in results if r.variant == "inductor" and r.status == "ok"), None)
    llama = results[0].case != "lm-head"
    rows = []
    for r in results:
        ok = r.status == "ok"
        row = [
            r.variant,
            _fmt(r.peak_mib, ".0f") if ok else "-",
            _ratio(r.peak_mib, base and base.peak_mib) if ok else "-",
            _fmt(r.step_ms, ".1f"),
            _ratio(r.step_ms, base and base.step_ms) if ok else "-",
        ]
        if llama:
            row.append(f"{r.tokens / (r.step_ms / 1e3):.0f}" if ok else "-")
        row += [_fmt(r.first_step_s, ".1f"), _fmt(r.loss, ".6f"), _loss_diff(r, base), r.status]
        rows.append(row)
    headers = ["variant", "peak MiB", "peak / inductor", "step ms", "time / inductor"]
    headers += ["tokens/s"] * llama + ["first step s", "loss", "|loss - inductor|", "status"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def describe(case: str, args) -> str:
    sizes = SIZES["smoke" if args.smoke else "full"]
    dtype = str(args.dtype).removeprefix("torch.")
    if case == "lm-head":
        s = sizes["head"]
        return (
            f"lm-head: x {args.tokens or s['tokens']} x {s['hidden']}, W {s['vocab']} x {s['hidden']}, {dtype}, "
            "one label in 7 ignored. Peak = max_memory_allocated over a step - memory allocated before it "
            "- the gradients of x and W: the peak above the inputs and their gradients."
        )
    s = sizes["llama"]
    ckpt = ", gradient checkpointing (use_reentrant=False)" if case == "llama-1b-ckpt" else ""
    return (
        f"{case}: LlamaForCausalLM hidden {s['hidden']}, intermediate {s['intermediate']}, vocab {s['vocab']}, "
        f"{s['layers']} layers, {s['heads']} heads / {s['kv_heads']} kv, tied embeddings, {dtype}, sdpa, "
        f"1 x {args.tokens or s['tokens']} tokens{ckpt}. Peak = max_memory_allocated over a step - memory "
        "allocated before it (weights included there, so not in the peak; their gradients are in it)."
    )


def header(args) -> str:
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"{args.device} (no CUDA memory figures)"
    versions = " ".join(f"{name}={_version(name)}" for name in ("triton", "transformers"))
    peers = " ".join(f"{name}={_version(name)}" for name in ("liger-kernel", "cut-cross-entropy"))
    command = shlex.join(["python", *sys.argv])
    return f"device: {device}\ntorch={torch.__version__} {versions} {peers}\ncommand: {command}"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def _loss_diff(r: Result, base: Result | None) -> str:
    if r.loss is None or base is None or base.loss is None:
        return "-"
    return f"{abs(r.loss - base.loss):.2e}"


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all", choices=[*CASES, "all"])
    p.add_argument("--tokens", type=int, help="override the case's token count")
    p.add_argument("--steps", type=int, default=3, help="measured steps (median time, max peak)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps; the first compiles")
    p.add_argument("--device", help="default: cuda, or cpu with --smoke")
    p.add_argument("--cold", action="store_true", help="an empty Inductor cache per variant (longer run)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, fp32, CPU unless --device: tests the script")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    args.warmup = max(1, args.warmup)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available; run it on a GPU machine, or use --smoke to test it on CPU.",
              file=sys.stderr)  # fmt: skip
        return 2
    cases = CASES if args.case == "all" else (args.case,)
    warm_process(args.device)
    results = {}
    for case in cases:
        variants = VARIANTS["lm-head" if case == "lm-head" else "llama"]
        results[case] = [run_variant(case, variant, args) for variant in variants]
    print(header(args))
    for case in cases:
        print(f"\n{describe(case, args)}\n")
        print(table(results[case]))
    print(f"\ntotal wall time {time.perf_counter() - STARTED:.0f} s")
    if args.json:
        cases = {case: [dataclasses.asdict(r) for r in rows] for case, rows in results.items()}
        payload = {"header": header(args), "cases": cases}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
