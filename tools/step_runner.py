"""Runs training steps of one configuration in a child process and measures them.

Shared by `bench.py` and `demo.py`. Each configuration gets its own process so that one's memory
can't hide another's. On CPU the child runs with MALLOC_MMAP_THRESHOLD_=65536 (glibc then hands
freed tensors back to the OS at once), resets the peak with `echo 5 > /proc/self/clear_refs` and
reads VmHWM; the figure is the rise of the peak over the resident size before the step. On CUDA
it is `torch.cuda.max_memory_allocated()` over what was allocated before the step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

VARIANTS = ("eager", "inductor", "mst")


@dataclasses.dataclass
class RunSpec:
    variant: str  # eager | inductor | mst
    model: str = "mlp-stack"  # mlp-stack | llama | gpt2
    tokens: int = 8192
    batch: int = 1
    hidden: int = 256
    intermediate: int = 1024
    vocab: int = 32000
    layers: int = 4
    steps: int = 2  # measured steps, after one warm-up step that compiles
    optimizer: bool = False  # AdamW step after backward
    checkpointing: bool = False  # activation checkpointing of every layer (HF's switch, or per block)
    device: str = "cpu"
    dtype: str = "float32"
    options: dict = dataclasses.field(default_factory=dict)  # mst backend options
    seed: int = 0


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    peak_mb: float  # rise of peak memory over the first measured step
    step_s: float  # mean wall time of the measured steps
    losses: list[float]  # every step's loss, warm-up included


def run_in_child(spec: RunSpec, timeout: float | None = None) -> RunResult:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), json.dumps(dataclasses.asdict(spec))],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{spec.variant} run failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return RunResult(spec, result["peak_mb"], result["step_s"], result["losses"])


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
    elif spec.model in ("llama", "gpt2"):
        if spec.model == "llama":
            model = models.tiny_llama(spec.hidden, spec.intermediate, spec.layers, spec.vocab)
        else:
            model = models.tiny_gpt2(spec.hidden, spec.layers, spec.vocab)
        if spec.checkpointing:
            models.enable_checkpointing(model)
        loss_fn = lambda m, ids, labels: m(ids, labels=labels).loss
    else:
        raise ValueError(f"unknown model {spec.model!r}; choose mlp-stack, llama or gpt2")
    ids, labels = models.random_batch(spec.vocab, spec.batch, spec.tokens, ignore_every=7, seed=spec.seed)
    model = model.to(device=spec.device, dtype=getattr(torch, spec.dtype))
    return model, (ids.to(spec.device), labels.to(spec.device)), loss_fn


def compiled(model, spec: RunSpec):
    import torch

    if spec.variant == "eager":
        return model
    if spec.variant == "inductor":
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


def child_main(spec: RunSpec) -> dict:
    import torch

    model, (ids, labels), loss_fn = build(spec)
    step_model = compiled(model, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3) if spec.optimizer else None

    def step() -> float:
        loss = loss_fn(step_model, ids, labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step()]  # warm-up: compiles, and creates the optimizer state
    peaks, times = [], []
    for _ in range(spec.steps):
        with PeakMemory(spec.device) as peak:
            start = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - start)
        peaks.append(peak.peak)
    return {"peak_mb": peaks[0] / 2**20, "step_s": sum(times) / len(times), "losses": losses}


if __name__ == "__main__":
    print(json.dumps(child_main(RunSpec(**json.loads(sys.argv[1])))))
