"""Sequence-length benchmarks on a Llama-shaped model: the longest training step that fits a memory
budget, and tokens per second at lengths every variant fits. Each probe runs in its own process.

    python tools/seq_bench.py max-length --json docs/max_length.json     # issue 5, item 1
    python tools/seq_bench.py throughput --tokens 1024,2048              # issue 5, item 2

Variants: eager, inductor, inductor+ckpt, mst, mst+ckpt ("+ckpt": HF activation checkpointing of
every decoder layer, non-reentrant). Ratios are to Inductor in the same run.

How the budget is enforced (CPU): a watchdog thread in the child polls VmRSS every 5 ms and ends
the child once the step's rise passes the budget; a probe fits when its measured step's peak rise
(VmHWM, as in step_runner, so a spike between polls still counts) is within the budget. RLIMIT_AS
was not used: it caps virtual address space, which torch's libraries, OpenMP threads and glibc's
per-thread arenas inflate by amounts unrelated to the step, and an allocation refused inside a
compiled kernel is not always a clean error. On CUDA the budget caps the caching allocator
(`torch.cuda.set_per_process_memory_fraction`) and an out-of-memory error ends the probe.

How a length is searched: every probe is a fresh process that compiles once, for that length only
(static shapes, what a user's first compile does), runs a warm-up step and one measured step. The
first probe is --start tokens; peak memory grows about linearly with tokens, so the next is where
the line through the origin and that point meets the budget (fixed costs such as weight gradients
make it undershoot: it fits, and gives a second point near the budget), and later ones are where
the line through the two longest fitting lengths meets it, clamped into the bracket; after a miss
the search bisects. It stops when the bracket is within max(--granularity, --precision x length).
Far fewer long, slow probes than doubling and bisecting alone. --max-tokens bounds it ("≥").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable

from step_runner import OverBudget, RunSpec, run_in_child
from tabulate import tabulate

# variant name -> RunSpec fields
SEQ_VARIANTS = {
    "eager": {"variant": "eager"},
    "inductor": {"variant": "inductor"},
    "inductor+ckpt": {"variant": "inductor", "checkpointing": True},
    "mst": {"variant": "mst"},
    "mst+ckpt": {"variant": "mst", "checkpointing": True},
    # The attention pass alone (Inductor otherwise), and mst without it: with --attention-mask these
    # show what the N x N mask costs each.
    "inductor+attn": {"variant": "mst", "options": {"mlp": False, "lm_head": False}},
    "inductor+ckpt+attn": {"variant": "mst", "checkpointing": True, "options": {"mlp": False, "lm_head": False}},
    "mst-noattn": {"variant": "mst", "options": {"attention": False}},
    "mst+ckpt-noattn": {"variant": "mst", "checkpointing": True, "options": {"attention": False}},
    # mst without a memory budget: every site chunked at the lean rule and recomputed (before issue 28).
    # The max-length search's budget is a watchdog that memory_budget="auto" can't see (auto reads the
    # machine's free memory and would keep): search mst with these.
    "mst-lean": {"variant": "mst", "options": {"memory_budget": "off"}},
    "mst-lean+ckpt": {"variant": "mst", "checkpointing": True, "options": {"memory_budget": "off"}},
}
DEFAULT_VARIANTS = ("eager", "inductor", "inductor+ckpt", "mst", "mst+ckpt")


@dataclasses.dataclass
class Probe:
    tokens: int
    fits: bool
    peak_mb: float | None  # None when the watchdog ended the child before the step finished
    step_s: float | None
    wall_s: float  # the whole child: start, compile, warm-up and measured step
    note: str = ""  # "over budget" / "timed out"
    rewritten: dict | None = None  # mst: sites rewritten per kind (step_runner.RunResult)
    graph_breaks: int | None = None  # compiled variants: distinct graph breaks Dynamo met


@dataclasses.dataclass
class Search:
    variant: str
    max_tokens: int  # longest length that fit; 0 when not even --granularity did
    first_failing: int | None  # shortest length that did not fit; None: the search stopped at --max-tokens
    probes: list[Probe]


def shape_args(p: argparse.ArgumentParser) -> None:
    # Default: vocab / hidden and intermediate / hidden as in Llama-3.2-1B (128256 / 2048, 8192 / 2048).
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"subset of {','.join(SEQ_VARIANTS)}")
    p.add_argument(
        "--attention-mask", action="store_true", help="pass an all-ones attention_mask (transformers then builds N x N)"
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda: the budget is then a cap on the caching allocator")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--timeout", type=float, default=600, help="seconds one child may take")
    p.add_argument("--json", help="write every measurement here")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("max-length", help="longest token count whose training step fits the budget")
    shape_args(m)
    m.add_argument("--budget-mb", type=float, default=1024, help="cap on the step's peak memory rise")
    m.add_argument("--start", type=int, default=SearchRule.start)
    m.add_argument("--granularity", type=int, default=SearchRule.granularity, help="probed lengths are multiples")
    m.add_argument("--precision", type=float, default=SearchRule.precision, help="relative width of the last bracket")
    m.add_argument("--max-tokens", type=int, default=SearchRule.max_tokens, help="stop searching past this length")
    m.add_argument("--max-probes", type=int, default=SearchRule.max_probes, help="per variant")
    t = sub.add_parser("throughput", help="tokens per second at lengths every variant fits")
    shape_args(t)
    t.add_argument("--tokens", default="1024,2048", help="comma-separated lengths")
    t.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up")
    return p.parse_args(argv)


def spec_for(args, variant: str, tokens: int, **extra) -> RunSpec:
    shape = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "vocab": args.vocab}
    shape.update(device=args.device, dtype=args.dtype)
    return RunSpec(
        model="llama", tokens=tokens, attention_mask=args.attention_mask, **shape, **SEQ_VARIANTS[variant], **extra
    )


# ---------------------------------------------------------------- max length


def run_probe(args, variant: str, tokens: int) -> Probe:
    spec = spec_for(args, variant, tokens, steps=1, budget_mb=args.budget_mb)
    start = time.perf_counter()
    try:
        result = run_in_child(spec, timeout=args.timeout)
    except OverBudget:
        return Probe(tokens, False, None, None, time.perf_counter() - start, "over budget")
    except subprocess.TimeoutExpired:
        return Probe(tokens, False, None, None, time.perf_counter() - start, "timed out")
    fits = result.peak_mb <= args.budget_mb
    note = "" if fits else "over budget (peak)"
    wall_s = time.perf_counter() - start
    return Probe(tokens, fits, result.peak_mb, result.step_s, wall_s, note, result.rewritten, result.graph_breaks)


@dataclasses.dataclass(frozen=True)
class SearchRule:
    budget_mb: float
    start: int = 2048
    granularity: int = 256  # every probed length is a multiple of it
    precision: float = 0.05  # done when the bracket is within max(granularity, precision x longest fit)
    max_tokens: int = 65536
    max_probes: int = 8

    def tolerance(self, tokens: int) -> int:
        return max(self.granularity, _floor(int(self.precision * tokens), self.granularity))


MAX_EXTRAPOLATION = 32  # a probe is at most this many times the longest length that fit so far


def next_length(probes: list[Probe], rule: SearchRule) -> int | None:
    """The next token count to probe, or None when the search is done.

    With one fitting length and no failure, the guess is the budget scaled by tokens / peak: fixed
    costs (weight gradients) make that undershoot, so it fits and gives a second point near the
    budget. With two, it is where the line through the two longest meets the budget. After a
    miss it bisects the bracket: the line was wrong there.
    """
    if not probes:
        return rule.start
    fitting = sorted((p for p in probes if p.fits), key=lambda p: p.tokens)
    lo = fitting[-1].tokens if fitting else 0
    hi = min((p.tokens for p in probes if not p.fits), default=None)
    g = rule.granularity
    if hi is None and lo >= rule.max_tokens:
        return None
    if hi is not None and hi - lo <= rule.tolerance(lo):
        return None
    if not fitting:  # even the first length did not fit: halve
        return _floor(hi // 2, g) if hi > g else None
    if hi is None:
        guess = _where_line_meets(fitting[-2] if len(fitting) > 1 else None, fitting[-1], rule.budget_mb)
        upper = min(rule.max_tokens, MAX_EXTRAPOLATION * lo)
    else:
        missed = not probes[-1].fits or len(fitting) < 2
        guess = (lo + hi) // 2 if missed else _where_line_meets(fitting[-2], fitting[-1], rule.budget_mb)
        upper = hi - g
    return min(upper, max(lo + rule.tolerance(lo), _floor(guess, g)))


def _where_line_meets(a: Probe | None, b: Probe, budget_mb: float) -> int:
    """Tokens at which the line through two (tokens, peak) points, or through the origin and one
    point, reaches the budget."""
    a_tokens, a_peak = (0, 0.0) if a is None else (a.tokens, a.peak_mb)
    slope = (b.peak_mb - a_peak) / (b.tokens - a_tokens)
    if slope <= 0:
        return 2 * b.tokens
    return int(b.tokens + (budget_mb - b.peak_mb) / slope)


def _floor(tokens: int, granularity: int) -> int:
    return max(granularity, tokens // granularity * granularity)


def search_max_length(probe: Callable[[int], Probe], rule: SearchRule) -> Search:
    probes: list[Probe] = []
    while len(probes) < rule.max_probes:
        tokens = next_length(probes, rule)
        if tokens is None:
            break
        probes.append(probe(tokens))
        if probes[-1].note == "timed out":
            break  # a time limit says nothing about memory: stop rather than guess
    longest = max((p.tokens for p in probes if p.fits), default=0)
    first_failing = min((p.tokens for p in probes if not p.fits), default=None)
    return Search("", longest, first_failing, probes)


def max_length_main(args) -> int:
    searches = []
    for variant in args.variants.split(","):
        print(f"searching {variant} ...", file=sys.stderr, flush=True)

        def probe(tokens, variant=variant):
            found = run_probe(args, variant, tokens)
            peak = "-" if found.peak_mb is None else f"{found.peak_mb:.0f} MB"
            print(f"  {tokens:>6} tokens: {peak:>8} {found.note} ({found.wall_s:.0f} s)", file=sys.stderr, flush=True)
            return found

        rule = SearchRule(
            args.budget_mb, args.start, args.granularity, args.precision, args.max_tokens, args.max_probes
        )
        search = search_max_length(probe, rule)
        searches.append(dataclasses.replace(search, variant=variant))
    print(header(args, f"budget={args.budget_mb:.0f} MB (rise of peak RSS over the step)"))
    print(max_length_table(searches))
    if args.json:
        dump(args, {"command": "max-length", "searches": [dataclasses.asdict(s) for s in searches]})
    return 0


def max_length_table(searches: list[Search]) -> str:
    base = next((s.max_tokens for s in searches if s.variant == "inductor"), None)
    rows = []
    for s in searches:
        at_max = next((p for p in s.probes if p.tokens == s.max_tokens), None)
        rows.append([
            s.variant,
            ("≥ " if s.first_failing is None else "") + str(s.max_tokens),
            _ratio(s.max_tokens, base),
            "-" if s.first_failing is None else str(s.first_failing),
            "-" if at_max is None else f"{at_max.peak_mb:.0f}",
            _sites(at_max),
            "-" if at_max is None or at_max.graph_breaks is None else str(at_max.graph_breaks),
            len(s.probes),
            f"{sum(p.wall_s for p in s.probes):.0f}",
        ])  # fmt: skip
    headers = ["variant", "max tokens", "max / inductor", "shortest over", "peak MB at max", "rewritten at max",
               "graph breaks", "probes", "search s"]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _sites(probe: Probe | None) -> str:
    """The sites mst rewrote in the probe's step, per kind: "mlp gated 8, attention 1, lm_head 1"."""
    if probe is None or probe.rewritten is None:
        return "-"
    return ", ".join(f"{kind} {count}" for kind, count in sorted(probe.rewritten.items())) or "none"


# ---------------------------------------------------------------- throughput


def throughput_main(args) -> int:
    lengths = [int(t) for t in args.tokens.split(",")]
    measured = {}
    for tokens in lengths:
        for variant in args.variants.split(","):
            print(f"running {variant} at {tokens} tokens ...", file=sys.stderr, flush=True)
            spec = spec_for(args, variant, tokens, steps=args.steps)
            measured[(variant, tokens)] = run_in_child(spec, timeout=args.timeout, cold=True)
    print(header(args, f"steps={args.steps} measured after one warm-up"))
    print(throughput_table(measured, lengths, args.variants.split(",")))
    if args.json:
        rows = [
            {
                "variant": v,
                "tokens": n,
                "peak_mb": r.peak_mb,
                "step_s": r.step_s,
                "warmup_s": r.warmup_s,
                "losses": r.losses,
            }
            for (v, n), r in measured.items()
        ]
        dump(args, {"command": "throughput", "runs": rows})
    return 0


def throughput_table(measured: dict, lengths: list[int], variants: list[str]) -> str:
    rows = []
    for tokens in lengths:
        base = measured.get(("inductor", tokens))
        for variant in variants:
            r = measured[(variant, tokens)]
            rate = tokens / r.step_s
            rows.append([
                tokens, variant, f"{rate:.0f}", _ratio(rate, base and tokens / base.step_s),
                _ratio(r.warmup_s, base and base.warmup_s), f"{r.peak_mb:.0f}", _ratio(r.peak_mb, base and base.peak_mb),
                f"{r.losses[-1]:.6f}",
            ])  # fmt: skip
    headers = [
        "tokens", "variant", "tokens/s", "tokens/s / inductor", "first step / inductor's (cold compile)",
        "peak MB", "peak / inductor", "loss",
    ]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


# ---------------------------------------------------------------- shared


def header(args, extra: str) -> str:
    import torch
    import transformers

    return (
        f"model=llama hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
        f"vocab={args.vocab} batch=1 device={args.device} dtype={args.dtype} "
        f"attention_mask={'all ones' if args.attention_mask else 'none'} {extra} torch={torch.__version__} "
        f"transformers={transformers.__version__} machine={platform.machine()} "
        f"cores={len(__import__('os').sched_getaffinity(0))}"
    )


def dump(args, payload: dict) -> None:
    payload["args"] = {k: v for k, v in vars(args).items() if k != "json"}
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=1)


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if base else "-"


def main(argv=None) -> int:
    args = parse_args(argv)
    return max_length_main(args) if args.command == "max-length" else throughput_main(args)


if __name__ == "__main__":
    sys.exit(main())
