"""Mixture-of-experts benchmarks (issue 26, routed experts chunked over tokens): mst against Inductor
on Hugging Face Qwen3-MoE and Mixtral models with random weights, and a dense Llama for reference.
Every configuration runs in its own process (step_runner.run_in_child); ratios are to Inductor in
the same run.

    python tools/moe_bench.py ratios --json docs/moe_bench.json
    python tools/moe_bench.py max-length --json docs/moe_bench.json

Shapes (hidden 256, vocab 32000, 4 heads, every layer sparse, no shared expert, router logits
returned so `.loss` includes the aux loss, SDPA attention):
    llama      dense, intermediate 896
    qwen3-moe  16 experts, top-8, expert width 96  (k·I/d = 3, as in Qwen3-30B-A3B), norm_topk_prob
    mixtral    8 experts, top-2, expert width 896  (k·I/d = 7, as in Mixtral-8x7B)

`ratios`: peak memory rise and step time of inductor and mst at one length.
`max-length`: the longest sequence whose step fits the budget, on the qwen3-moe shapes, for
inductor, inductor+ckpt, mst and mst+ckpt; the search is seq_bench's (search_max_length).
The JSON file keeps both commands' results: each run replaces only its own key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

from seq_bench import Probe, SearchRule, _ratio, max_length_table, search_max_length
from step_runner import MOE_MODELS, OverBudget, RunSpec, run_in_child
from tabulate import tabulate

MODELS = {  # name -> RunSpec shape fields
    "llama": {"model": "llama", "intermediate": 896},
    "qwen3-moe": {"model": "qwen3-moe", "experts": 16, "top_k": 8, "moe_intermediate": 96},
    "mixtral": {"model": "mixtral", "experts": 8, "top_k": 2, "moe_intermediate": 896},
}
VARIANTS = {
    "inductor": {"variant": "inductor"},
    "inductor+ckpt": {"variant": "inductor", "checkpointing": True},
    "mst": {"variant": "mst"},  # the default budget, "auto"
    "mst-off": {"variant": "mst", "options": {"memory_budget": "off"}},  # every site chunked and recomputed
    "mst+ckpt": {"variant": "mst", "checkpointing": True},
    "mst@2048": {"variant": "mst", "options": {"chunk_size": 2048}},  # fewer, longer chunks than "auto"
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("ratios", "max-length"):
        s = sub.add_parser(name)
        s.add_argument("--hidden", type=int, default=256)
        s.add_argument("--vocab", type=int, default=32000)
        s.add_argument("--layers", type=int, default=8)
        s.add_argument("--timeout", type=float, default=600, help="seconds one child may take")
        s.add_argument("--json", help="write the results here (under the command's key)")
    r = sub.choices["ratios"]
    r.add_argument("--models", default=",".join(MODELS))
    r.add_argument("--variants", default="inductor,mst")
    r.add_argument("--tokens", type=int, default=4096)
    r.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up steps")
    r.add_argument("--warmup", type=int, default=2, help="warm-up steps: under memory_budget='auto' the first runs "
                   "lean while it is measured and the second is the first that keeps")  # fmt: skip
    r.add_argument("--repeats", type=int, default=1, help="run every variant this many times, interleaved; "
                   "the table gives the mean step time and the largest peak")  # fmt: skip
    m = sub.choices["max-length"]
    m.add_argument("--model", default="qwen3-moe", choices=list(MODELS))
    m.add_argument("--variants", default="inductor,inductor+ckpt,mst,mst+ckpt")
    m.add_argument("--budget-mb", type=float, default=1024)
    m.add_argument("--start", type=int, default=2048)
    m.add_argument("--granularity", type=int, default=512)
    m.add_argument("--precision", type=float, default=0.05)
    m.add_argument("--max-tokens", type=int, default=65536)
    m.add_argument("--max-probes", type=int, default=6, help="per variant")
    return p.parse_args(argv)


def spec(args, model: str, variant: str, tokens: int, **extra) -> RunSpec:
    shape = dict(hidden=args.hidden, vocab=args.vocab, layers=args.layers, **MODELS[model])
    return RunSpec(tokens=tokens, **shape, **VARIANTS[variant], **extra)


# ---------------------------------------------------------------- ratios


def ratios_main(args) -> int:
    runs: dict[tuple[str, str], list] = {}
    for model in args.models.split(","):
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every variant
            for variant in args.variants.split(","):
                runs.setdefault((model, variant), []).append(_run_once(args, model, variant))
    merged = {key: _merged(results) for key, results in runs.items()}
    print(header(args, f"tokens={args.tokens} steps={args.steps} measured after {args.warmup} warm-up, repeats={args.repeats}"))
    print(ratios_table(merged))
    if args.json:
        rows = [
            {"model": m, "variant": v, "tokens": args.tokens, **({"failed": True} if r is None else {
                "peak_mb": r.peak_mb, "step_s": r.step_s, "step_s_each": [x.step_s for x in runs[(m, v)] if x],
                "warmup_s": r.warmup_s, "losses": r.losses, "rewritten": r.rewritten,
                "graph_breaks": r.graph_breaks, "code_outside": r.code_outside})}
            for (m, v), r in merged.items()
        ]  # fmt: skip
        dump(args, {"runs": rows})
    return 0


def _run_once(args, model: str, variant: str):
    print(f"running {model} {variant} at {args.tokens} tokens ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        r = run_in_child(spec(args, model, variant, args.tokens, steps=args.steps, warmup=args.warmup), args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"  failed: {str(e)[-2000:]}", file=sys.stderr, flush=True)
        return None
    print(f"  peak {r.peak_mb:.0f} MB, step {r.step_s:.2f} s, losses {r.losses}, rewritten {r.rewritten}, "
          f"breaks {r.graph_breaks} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return r


def _merged(results: list):
    """One result for the table: the largest peak and the mean step time of the runs; None if any failed."""
    if any(r is None for r in results):
        return None
    step = sum(r.step_s for r in results) / len(results)
    return dataclasses.replace(max(results, key=lambda r: r.peak_mb), step_s=step)


def ratios_table(runs: dict) -> str:
    rows = []
    for (model, variant), r in runs.items():
        base = runs.get((model, "inductor"))
        if r is None:
            rows.append([model, variant] + ["failed"] + ["-"] * 7)
            continue
        rows.append([
            model, variant, f"{r.peak_mb:.0f}", _ratio(r.peak_mb, base and base.peak_mb), f"{r.step_s:.2f}",
            _ratio(r.step_s, base and base.step_s), f"{r.losses[-1]:.6f}", _sites(r.rewritten),
            "-" if r.graph_breaks is None else str(r.graph_breaks),
            "-" if r.code_outside is None else str(r.code_outside),
        ])  # fmt: skip
    headers = ["model", "variant", "peak MB", "peak / inductor", "step s", "step / inductor", "loss",
               "rewritten", "graph breaks", "code outside"]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


# ---------------------------------------------------------------- max length


def max_length_main(args) -> int:
    searches = []
    for variant in args.variants.split(","):
        print(f"searching {args.model} {variant} ...", file=sys.stderr, flush=True)

        def probe(tokens, variant=variant) -> Probe:
            found = run_probe(args, variant, tokens)
            peak = "-" if found.peak_mb is None else f"{found.peak_mb:.0f} MB"
            print(f"  {tokens:>6} tokens: {peak:>8} {found.note} ({found.wall_s:.0f} s)", file=sys.stderr, flush=True)
            return found

        rule = SearchRule(args.budget_mb, args.start, args.granularity, args.precision, args.max_tokens, args.max_probes)
        searches.append(dataclasses.replace(search_max_length(probe, rule), variant=variant))
        print(max_length_table(searches), file=sys.stderr, flush=True)  # so far: a cut-short run keeps them
        if args.json:
            dump(args, {"model": args.model, "searches": [dataclasses.asdict(s) for s in searches]})
    print(header(args, f"model={args.model} budget={args.budget_mb:.0f} MB (rise of peak RSS over the step)"))
    print(max_length_table(searches))
    if args.json:
        dump(args, {"model": args.model, "searches": [dataclasses.asdict(s) for s in searches]})
    return 0


def run_probe(args, variant: str, tokens: int) -> Probe:
    """seq_bench.run_probe for any model of MODELS: one warm-up and one measured step under the budget."""
    start = time.perf_counter()
    try:
        result = run_in_child(spec(args, args.model, variant, tokens, steps=1, budget_mb=args.budget_mb), args.timeout)
    except OverBudget:
        return Probe(tokens, False, None, None, time.perf_counter() - start, "over budget")
    except subprocess.TimeoutExpired:
        return Probe(tokens, False, None, None, time.perf_counter() - start, "timed out")
    fits = result.peak_mb <= args.budget_mb
    wall_s = time.perf_counter() - start
    note = "" if fits else "over budget (peak)"
    return Probe(tokens, fits, result.peak_mb, result.step_s, wall_s, note, result.rewritten, result.graph_breaks)


# ---------------------------------------------------------------- shared


def header(args, extra: str) -> str:
    import torch
    import transformers

    shapes = "; ".join(
        f"{name}: experts={e} top_k={k} expert_width={w}" for name, (e, k, w) in MOE_MODELS.items()
    )
    return (
        f"hidden={args.hidden} vocab={args.vocab} layers={args.layers} heads=4 batch=1 float32 cpu; llama I=896; "
        f"{shapes}; {extra}\ntorch={torch.__version__} transformers={transformers.__version__} "
        f"cpu={_cpu_name()} machine={platform.machine()} cores={len(os.sched_getaffinity(0))} "
        f"threads={torch.get_num_threads()}"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def dump(args, payload: dict) -> None:
    import torch
    import transformers

    existing = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            existing = json.load(f)
    payload["args"] = {k: v for k, v in vars(args).items() if k != "json"}
    payload["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "cpu": _cpu_name(),
                           "threads": torch.get_num_threads()}  # fmt: skip
    existing[args.command.replace("-", "_")] = payload
    with open(args.json, "w") as f:
        json.dump(existing, f, indent=1)


def _sites(rewritten: dict | None) -> str:
    if rewritten is None:
        return "-"
    return ", ".join(f"{kind} {count}" for kind, count in sorted(rewritten.items())) or "none"


def main(argv=None) -> int:
    args = parse_args(argv)
    return ratios_main(args) if args.command == "ratios" else max_length_main(args)


if __name__ == "__main__":
    sys.exit(main())
