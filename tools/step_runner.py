"""Runs training steps of one configuration in a child process and measures them.

Shared by `bench.py` and `demo.py`. Each configuration gets its own process so that one's memory
can't hide another's. On CPU the child runs with MALLOC_MMAP_THRESHOLD_=65536 (glibc then hands
freed tensors back to the OS at once), resets the peak with `echo 5 > /proc/self/clear_refs` and
reads VmHWM; the figure is the rise of the peak over the resident size before the step. On CUDA
it is `torch.cuda.max_memory_allocated()` over what was allocated before the step.

With a memory budget (`RunSpec.budget_mb`, or `measure(..., budget_mb=)`), a watchdog thread in
the child polls VmRSS and ends the child with exit code OVER_BUDGET_EXIT (`run_in_child` then
raises `OverBudget`) once the step's rise passes the budget; a spike shorter than one poll is
still caught afterwards, since the reported peak is VmHWM: the caller compares it to the budget.
Other modules reuse the measuring with their own step: `measure()` inside their child and
`run_script_in_child()` in the parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

VARIANTS = ("eager", "inductor", "mst")
OVER_BUDGET_EXIT = 86  # the child's exit code when the watchdog ends it
# During the warm-up step the watchdog also lets compilation's own memory (Dynamo, AOTAutograd and
# Inductor state, kept for the process's life) through; it only bounds a runaway warm-up there.
COMPILE_ALLOWANCE_MB = 512


@dataclasses.dataclass
class RunSpec:
    variant: str  # eager | inductor | mst
    model: str = "mlp-stack"  # mlp-stack | llama | mistral | gpt2 | qwen3-moe | mixtral
    tokens: int = 8192
    batch: int = 1
    hidden: int = 256
    intermediate: int = 1024
    vocab: int = 32000
    layers: int = 4
    steps: int = 2  # measured steps, after the warm-up steps
    # warm-up steps: the first compiles; under memory_budget="auto" the second is the first that
    # keeps (the first runs lean while the budget is measured), and compiles the bodies that keep
    warmup: int = 1
    optimizer: bool = False  # AdamW step after backward
    checkpointing: bool = False  # activation checkpointing of every layer (HF's switch, or per block)
    device: str = "cpu"
    dtype: str = "float32"
    options: dict = dataclasses.field(default_factory=dict)  # mst backend options
    seed: int = 0
    attention_mask: bool = False  # HF models: pass an all-ones attention_mask, as Trainer's collators do
    forced_causal: bool = False  # HF models: attention is SDPA with is_causal=True, any mask ignored
    budget_mb: float | None = None  # cap on the step's memory rise: the child is ended past it (see measure)
    experts: int = 0  # MoE models: routed experts per layer (0: the model's default below)
    top_k: int = 0  # MoE models: experts per token (0: the model's default below)
    moe_intermediate: int = 0  # MoE models: one expert's width (0: the model's default below)
    window: int = 0  # mistral: its sliding window in tokens (0: none, plain causal)
    documents: int = 0  # HF models: pack this many documents in each row (position_ids restarting)
    # inductor: torch's `activation_memory_budget` (0 recompute all .. 1 its default), or None
    activation_memory_budget: float | None = None


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    peak_mb: float  # rise of peak memory over the first measured step
    step_s: float  # mean wall time of the measured steps
    losses: list[float]  # every step's loss, warm-up included
    warmup_s: float | None = None  # wall time of the warm-up step: compilation and one step
    rewritten: dict | None = None  # mst: sites rewritten per kind, as one step runs them (last_report)
    graph_breaks: int | None = None  # compiled variants: the distinct graph breaks Dynamo met
    code_outside: int | None = None  # mst: of those, how many ran code outside every graph mst saw


class OverBudget(RuntimeError):
    """The child passed its memory budget and was ended by its watchdog."""


def run_in_child(spec: RunSpec, timeout: float | None = None, cold: bool = False) -> RunResult:
    """`cold`: the child gets an empty Inductor cache, so its warm-up is a first compile."""
    result = run_script_in_child(os.path.abspath(__file__), dataclasses.asdict(spec), timeout, spec.variant, cold)
    counted = ("warmup_s", "rewritten", "graph_breaks", "code_outside")
    return RunResult(spec, result["peak_mb"], result["step_s"], result["losses"], **{k: result.get(k) for k in counted})


def run_script_in_child(
    script: str, payload: dict, timeout: float | None = None, what: str = "child", cold: bool = False
) -> dict:
    """`python script JSON(payload)` under the measuring environment; the JSON its stdout ends with.

    Raises OverBudget when the child's watchdog ended it, subprocess.TimeoutExpired past `timeout`
    and RuntimeError (with the end of its stderr) for any other failure.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    with tempfile.TemporaryDirectory(prefix="mst-cold-cache-") as cache:
        if cold:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        done = subprocess.run(
            [sys.executable, script, json.dumps(payload)],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
    if done.returncode == OVER_BUDGET_EXIT:
        raise OverBudget(f"{what} passed its memory budget: {done.stderr.strip().splitlines()[-1]}")
    if done.returncode != 0:
        raise RuntimeError(f"{what} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build(spec: RunSpec):
    """(model, step_inputs, loss_fn) with random weights; nothing is downloaded."""
    import torch

    from mst_fx import models

    torch.manual_seed(spec.seed)
    if spec.model == "mlp-stack":
        model = models.MLPStack(
            spec.vocab, spec.hidden, spec.intermediate, spec.layers, checkpointing=spec.checkpointing
        )
        loss_fn = lambda m, ids, labels: m(ids, labels)
    elif spec.model in ("llama", "mistral", "gpt2", *MOE_MODELS):
        if spec.model == "llama":
            model = models.tiny_llama(spec.hidden, spec.intermediate, spec.layers, spec.vocab)
        elif spec.model == "mistral":
            model = tiny_mistral(spec)
        elif spec.model in MOE_MODELS:
            model = tiny_moe(spec)
        else:
            model = models.tiny_gpt2(spec.hidden, spec.layers, spec.vocab)
        if spec.checkpointing:
            models.enable_checkpointing(model)
            if spec.model in MOE_MODELS:
                # transformers collects router logits with a hook that appends to a list: inside a
                # checkpointed layer Dynamo refuses that side effect unless the backward's recompute
                # skips it (torchtitan's setting), and every layer would run uncompiled
                torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        if spec.forced_causal:
            model.set_attn_implementation(_register_forced_causal_attention())
        loss_fn = None  # below: it may take an attention mask of the batch's shape
    else:
        raise ValueError(f"unknown model {spec.model!r}; choose mlp-stack, llama, mistral, gpt2, qwen3-moe or mixtral")
    ids, labels = models.random_batch(spec.vocab, spec.batch, spec.tokens, ignore_every=7, seed=spec.seed)
    model = model.to(device=spec.device, dtype=getattr(torch, spec.dtype))
    ids, labels = ids.to(spec.device), labels.to(spec.device)
    if loss_fn is None:
        extra = {"attention_mask": torch.ones_like(ids)} if spec.attention_mask else {}
        if spec.documents:  # as DataCollatorWithFlattening and TRL's padding_free feed the model
            extra.update(position_ids=packed_positions(spec.batch, spec.tokens, spec.documents).to(spec.device),
                         use_cache=False)  # fmt: skip
        loss_fn = lambda m, ids, labels: m(ids, labels=labels, **extra).loss
    return model, (ids, labels), loss_fn


# MoE models: (experts, top_k, expert width) when RunSpec leaves them 0. With hidden 256, k·I/d is
# 3 for qwen3-moe (as in Qwen3-30B-A3B: 8 x 768 / 2048) and 7 for mixtral (2 x 14336 / 4096).
MOE_MODELS = {"qwen3-moe": (16, 8, 96), "mixtral": (8, 2, 896)}


def tiny_moe(spec: RunSpec):
    """A Hugging Face `Qwen3MoeForCausalLM` or `MixtralForCausalLM` with random weights: every layer
    sparse, no shared expert, SDPA attention, router logits returned so `.loss` has the aux loss."""
    default_experts, default_top_k, default_width = MOE_MODELS[spec.model]
    common = dict(
        hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=spec.vocab, max_position_embeddings=1 << 17, num_experts_per_tok=spec.top_k or default_top_k,
        output_router_logits=True, router_aux_loss_coef=0.001, attn_implementation="sdpa",
    )  # fmt: skip
    experts, width = spec.experts or default_experts, spec.moe_intermediate or default_width
    if spec.model == "qwen3-moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(
            num_experts=experts, moe_intermediate_size=width, intermediate_size=width, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[], **common,
        )  # fmt: skip
        return Qwen3MoeForCausalLM(config)
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(num_local_experts=experts, intermediate_size=width, **common))


def tiny_mistral(spec: RunSpec):
    """A Hugging Face `MistralForCausalLM` with random weights, SDPA attention, attending in a
    sliding window of `spec.window` tokens (or causally, with no window)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=spec.vocab, max_position_embeddings=1 << 17,
        sliding_window=spec.window or None, attn_implementation="sdpa",
    )  # fmt: skip
    return MistralForCausalLM(config)


def packed_positions(batch: int, tokens: int, documents: int):
    """Position ids of `documents` packed in each row, restarting at each: lengths from a fixed
    seed, between half and one and a half times the mean."""
    import torch

    g = torch.Generator().manual_seed(documents)
    weights = 0.5 + torch.rand(documents, generator=g)
    lengths = (weights / weights.sum() * tokens).long()
    lengths[-1] += tokens - lengths.sum()
    return torch.cat([torch.arange(int(n)) for n in lengths]).expand(batch, -1)


def _register_forced_causal_attention() -> str:
    """An HF attention function that is SDPA with is_causal=True: the reference the attention pass
    must match when the batch has no padding. No mask function is registered under its name, so
    transformers builds no mask for it."""
    import torch.nn.functional as F
    from transformers import AttentionInterface

    def forced_causal(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("forced_causal_sdpa", forced_causal)
    return "forced_causal_sdpa"


def compiled(model, spec: RunSpec):
    import torch

    if spec.variant == "eager":
        return model
    if spec.variant == "inductor":
        if spec.activation_memory_budget is not None:
            torch._functorch.config.activation_memory_budget = spec.activation_memory_budget
        return torch.compile(model)
    if spec.variant == "mst":
        return torch.compile(model, backend="mst", options=spec.options or None)
    raise ValueError(f"unknown variant {spec.variant!r}; choose one of {VARIANTS}")


class PeakMemory:
    """Peak memory over a region, in bytes above what was in use when it began."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _status_kb("VmHWM") * 1024 - self.base


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class MemoryWatchdog:
    """Ends the process with OVER_BUDGET_EXIT once its resident size rises more than the armed
    limit over what it was when armed. Polls VmRSS every `interval` seconds from a daemon thread
    (reading /proc takes the GIL for some microseconds; torch's kernels run without it)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.base_kb, self.limit_kb = interval, 0, None
        threading.Thread(target=self._watch, daemon=True).start()

    def arm(self, limit_mb: float) -> None:
        self.base_kb, self.limit_kb = _status_kb("VmRSS"), limit_mb * 1024

    def _watch(self) -> None:
        while True:
            time.sleep(self.interval)
            rise_kb = _status_kb("VmRSS") - self.base_kb
            if self.limit_kb is not None and rise_kb > self.limit_kb:
                print(f"over budget: rise {rise_kb / 1024:.0f} MB > {self.limit_kb / 1024:.0f} MB", file=sys.stderr)
                sys.stderr.flush()
                os._exit(OVER_BUDGET_EXIT)


def measure(
    step: Callable[[], float], steps: int, device: str = "cpu", budget_mb: float | None = None, warmup: int = 1
) -> dict:
    """`warmup` calls of `step` (the first compiles), then `steps` measured ones.

    Returns the peak rise over the first measured step, their mean time, every call's loss and
    the first warm-up's time.
    With `budget_mb` the process ends itself with OVER_BUDGET_EXIT: on CPU once a measured step
    rises past the budget, or the warm-up past it plus COMPILE_ALLOWANCE_MB; on CUDA (untested
    here) when the caching allocator, capped at what is allocated plus the budget, runs out.
    """
    cuda = device.startswith("cuda")
    watchdog = MemoryWatchdog() if budget_mb is not None and not cuda else None
    if budget_mb is not None and cuda:
        step = _ending_on_cuda_oom(step)
        _cap_cuda_memory(budget_mb)
    if watchdog:
        watchdog.arm(budget_mb + COMPILE_ALLOWANCE_MB)
    start = time.perf_counter()
    losses = [step()]
    warmup_s = time.perf_counter() - start
    losses += [step() for _ in range(warmup - 1)]
    peaks, times = [], []
    for _ in range(steps):
        if watchdog:
            watchdog.arm(budget_mb)
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - start)
        peaks.append(peak.peak)
    return {"peak_mb": peaks[0] / 2**20, "step_s": sum(times) / len(times), "losses": losses, "warmup_s": warmup_s}


def _cap_cuda_memory(budget_mb: float) -> None:
    """Lets the caching allocator hold what is allocated now plus the budget (not measured here)."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    allowed = torch.cuda.memory_allocated() + budget_mb * 2**20
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total))


def _ending_on_cuda_oom(step: Callable[[], float]) -> Callable[[], float]:
    import torch

    def guarded() -> float:
        try:
            return step()
        except torch.OutOfMemoryError as e:
            print(f"over budget: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(OVER_BUDGET_EXIT)

    return guarded


def child_main(spec: RunSpec) -> dict:
    import torch

    from mst_fx.tracing.graph_breaks import GraphBreakMonitor

    model, (ids, labels), loss_fn = build(spec)
    graph_breaks = GraphBreakMonitor()
    step_model = compiled(model, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3) if spec.optimizer else None

    def step() -> float:
        loss = loss_fn(step_model, ids, labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    # The warm-up compiles, and creates the optimizer state.
    measured = measure(step, spec.steps, spec.device, spec.budget_mb, spec.warmup)
    return {**measured, **what_was_compiled(spec, graph_breaks)}


def what_was_compiled(spec: RunSpec, graph_breaks) -> dict:
    """What a figure stands on: the sites mst rewrote and the graph breaks Dynamo met. The monitor
    sees only mst's graphs, so for Inductor only the breaks are counted, not where code ran."""
    if spec.variant == "eager":
        return {}
    if spec.variant != "mst":
        return {"graph_breaks": len(graph_breaks.breaks())}
    import collections

    import mst_fx

    report = mst_fx.last_report()
    rewritten = collections.Counter(s.kind for s in report.counted_sites if s.rewritten)
    return {"rewritten": dict(rewritten), "graph_breaks": len(report.graph_breaks), "code_outside": len(report.code_outside)}


if __name__ == "__main__":
    print(json.dumps(child_main(RunSpec(**json.loads(sys.argv[1])))))
