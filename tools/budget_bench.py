"""The memory budget (issue 28): what keeping instead of recomputing buys, and what it costs.

    python tools/budget_bench.py lengths --json docs/budget_lengths.json
    python tools/budget_bench.py stack --json docs/budget_stack.json
    python tools/budget_bench.py sweep --json docs/budget_sweep.json --plot docs/budget_sweep.png

`lengths`: the docs' Llama-shaped model (hidden 512, intermediate 2048, 2 layers, vocab 32000) at
1024 to 32768 tokens: Inductor, mst with its default budget ("auto"), and mst without a budget
(`memory_budget="off"`, every site chunked and recomputed: mst before the budget).
`stack`: four MLPs and a head and nothing else (`bench.py --model mlp-stack`), where recompute
weighs most. `sweep`: one model and length, mst's peak and step time against its byte budget, and
beside it Inductor under torch's `activation_memory_budget` (a ratio) on the same model and length.

Every configuration runs in its own process (`step_runner.py`: two warm-up steps, then the measured
steps; peak = rise of VmHWM over the first measured one). Under "auto" the first step runs lean
while the budget is measured and the second is the first that keeps (it compiles the bodies that
keep), so every variant gets two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

from step_runner import RunSpec, run_in_child, run_script_in_child
from tabulate import tabulate

LLAMA = {"model": "llama", "hidden": 512, "intermediate": 2048, "layers": 2, "vocab": 32000}
STACK = {"model": "mlp-stack", "hidden": 256, "intermediate": 1024, "layers": 4, "vocab": 32000}
VARIANTS = {
    "inductor": {"variant": "inductor"},
    "mst": {"variant": "mst"},
    "mst-lean": {"variant": "mst", "options": {"memory_budget": "off"}},
}


def _run(shape: dict, tokens: int, steps: int, timeout: float, **fields) -> dict:
    spec = RunSpec(tokens=tokens, steps=steps, warmup=2, **shape, **fields)
    print(f"running {fields} at {tokens} tokens ...", file=sys.stderr, flush=True)
    try:
        r = run_in_child(spec, timeout=timeout)
    except Exception as error:  # a configuration that fails is a row that says so
        return {"tokens": tokens, **fields, "error": f"{type(error).__name__}: {str(error)[-300:]}"}
    return {"tokens": tokens, **fields, "peak_mb": r.peak_mb, "step_s": r.step_s, "losses": r.losses}


def compare(shape: dict, lengths: list[int], steps: int, timeout: float) -> list[dict]:
    rows = []
    for tokens in lengths:
        for name, fields in VARIANTS.items():
            rows.append({**_run(shape, tokens, steps, timeout, **fields), "variant": name})
    return rows


def interleaved(shape: dict, tokens: int, rounds: int, timeout: float) -> dict[str, dict]:
    """Step times of the three variants compiled in one process and stepped in turn, `rounds`
    times after two warm-up steps each: machine noise then falls on all of them alike."""
    payload = {"shape": shape, "tokens": tokens, "rounds": rounds}
    print(f"timing inductor, mst, mst-lean in turn at {tokens} tokens ...", file=sys.stderr, flush=True)
    return run_script_in_child(__file__, payload, timeout, "interleaved timing")


def _interleaved_child(payload: dict) -> dict:
    import time

    import torch
    from step_runner import build, compiled

    spec = RunSpec(variant="inductor", tokens=payload["tokens"], **payload["shape"])
    model, inputs, loss_fn = build(spec)
    steppers = {}
    for name, fields in VARIANTS.items():
        steppers[name] = compiled(model, RunSpec(tokens=spec.tokens, **payload["shape"], **fields))

    def step(name: str) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_fn(steppers[name], *inputs).backward()
        return time.perf_counter() - start

    times = {name: [] for name in steppers}
    for name in steppers:
        step(name), step(name)
    for _ in range(payload["rounds"]):
        for name in steppers:
            times[name].append(step(name))
    del torch
    return {name: {"best_s": min(t), "median_s": sorted(t)[len(t) // 2], "all_s": t} for name, t in times.items()}


def timing_table(timings: dict[int, dict[str, dict]]) -> str:
    table = []
    for tokens, by_variant in timings.items():
        base = by_variant["inductor"]["median_s"]
        lean = by_variant["mst-lean"]["median_s"]
        for name, t in by_variant.items():
            table.append([tokens, name, f"{t['median_s']:.2f}", f"{t['best_s']:.2f}", f"{tokens / t['median_s']:.0f}",
                          _ratio(base, t["median_s"]), _ratio(lean, t["median_s"])])  # fmt: skip
    headers = ["tokens", "variant", "median step s", "best step s", "tokens/s", "tokens/s / inductor", "tokens/s / mst-lean"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def compare_table(rows: list[dict]) -> str:
    table = []
    for row in rows:
        if "error" in row:
            table.append([row["tokens"], row["variant"], row["error"][:60], "", "", "", "", ""])
            continue
        same = {r["variant"]: r for r in rows if r["tokens"] == row["tokens"] and "error" not in r}
        base, lean = same.get("inductor"), same.get("mst-lean")
        rate = row["tokens"] / row["step_s"]
        table.append([
            row["tokens"], row["variant"], f"{rate:.0f}", _ratio(base and base["step_s"], row["step_s"]),
            _ratio(lean and lean["step_s"], row["step_s"]), f"{row['peak_mb']:.0f}",
            _ratio(row["peak_mb"], base and base["peak_mb"]), _ratio(row["peak_mb"], lean and lean["peak_mb"]),
        ])  # fmt: skip
    headers = ["tokens", "variant", "tokens/s", "tokens/s / inductor", "tokens/s / mst-lean", "peak MB",
               "peak / inductor", "peak / mst-lean"]  # fmt: skip
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def sweep(shape: dict, tokens: int, budgets_mb: list[float], ratios: list[float], steps: int, timeout: float):
    rows = [{**_run(shape, tokens, steps, timeout, **VARIANTS["mst-lean"]), "variant": "mst-lean"}]
    for mb in budgets_mb:
        options = {"memory_budget": int(mb * 2**20)}
        rows.append({**_run(shape, tokens, steps, timeout, variant="mst", options=options), "budget_mb": mb})
    for ratio in ratios:
        fields = {"variant": "inductor", "activation_memory_budget": ratio}
        rows.append({"ratio": ratio, **_run(shape, tokens, steps, timeout, **fields)})
    return rows


def sweep_table(rows: list[dict]) -> str:
    table = []
    base = next((r for r in rows if r.get("ratio") == 1.0 and "error" not in r), None)
    for row in rows:
        setting = (f"memory_budget={row['budget_mb']:g} MiB" if "budget_mb" in row else
                   f"activation_memory_budget={row['ratio']:g}" if "ratio" in row else "memory_budget='off'")  # fmt: skip
        who = "inductor" if "ratio" in row else "mst"
        if "error" in row:
            table.append([who, setting, row["error"][:60], "", "", ""])
            continue
        table.append([
            who, setting, f"{row['peak_mb']:.0f}", f"{row['step_s']:.2f}",
            _ratio(row["peak_mb"], base and base["peak_mb"]), _ratio(row["step_s"], base and base["step_s"]),
        ])  # fmt: skip
    headers = ["compiler", "setting", "peak MB", "step s", "peak / inductor", "time / inductor"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if "error" not in r]
    mst = sorted((r for r in done if "budget_mb" in r), key=lambda r: r["budget_mb"])
    torch_ratio = sorted((r for r in done if "ratio" in r), key=lambda r: r["ratio"])
    ax.plot([r["peak_mb"] for r in mst], [r["step_s"] for r in mst], "^-", label="mst, memory_budget (bytes)")
    for r in mst:
        ax.annotate(f"{r['budget_mb']:g}M", (r["peak_mb"], r["step_s"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([r["peak_mb"] for r in torch_ratio], [r["step_s"] for r in torch_ratio], "o--",
            label="Inductor, activation_memory_budget (ratio)")  # fmt: skip
    for r in torch_ratio:
        ax.annotate(f"{r['ratio']:g}", (r["peak_mb"], r["step_s"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    lean = next((r for r in done if r["variant"] == "mst-lean"), None)
    if lean:
        ax.plot([lean["peak_mb"]], [lean["step_s"]], "kv", label="mst, memory_budget='off'")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("peak memory of the step, MB (log2)")
    ax.set_ylabel("step time, s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def _header() -> str:
    import torch
    import transformers

    return (f"torch={torch.__version__} transformers={transformers.__version__} machine={platform.machine()} "
            f"python={platform.python_version()}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    lengths = sub.add_parser("lengths", help="the docs' Llama at several lengths: inductor, mst, mst-lean")
    lengths.add_argument("--tokens", default="1024,2048,8192,32768")
    lengths.add_argument("--interleaved", type=int, default=0,
                         help="also time the three variants in one process, stepped in turn this many rounds")  # fmt: skip
    stack = sub.add_parser("stack", help="four MLPs and a head: inductor, mst, mst-lean")
    stack.add_argument("--tokens", default="8192")
    swept = sub.add_parser("sweep", help="peak and time against the budget, beside activation_memory_budget")
    swept.add_argument("--tokens", type=int, default=4096)
    swept.add_argument("--budgets-mb", default="16,32,64,128,256,512,1024,2048")
    swept.add_argument("--ratios", default="0,0.1,0.25,0.5,0.75,1")
    swept.add_argument("--plot", help="write the plot here (needs matplotlib)")
    for sp in (lengths, stack, swept):
        sp.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up")
        sp.add_argument("--timeout", type=float, default=3600, help="seconds one child may take")
        sp.add_argument("--json", help="write every measurement here")
    args = p.parse_args(argv)
    extra = {}
    if args.command == "sweep":
        rows = sweep(LLAMA, args.tokens, [float(b) for b in args.budgets_mb.split(",")],
                     [float(r) for r in args.ratios.split(",")], args.steps, args.timeout)  # fmt: skip
        text = sweep_table(rows)
        if args.plot:
            plot(rows, args.plot, f"Llama-shaped (hidden 512, I 2048, 2 layers, V 32000), {args.tokens} tokens, CPU fp32")
    else:
        shape = LLAMA if args.command == "lengths" else STACK
        lengths = [int(t) for t in args.tokens.split(",")]
        rows = compare(shape, lengths, args.steps, args.timeout)
        text = compare_table(rows)
        if getattr(args, "interleaved", 0):
            timings = {n: interleaved(shape, n, args.interleaved, args.timeout) for n in lengths}
            extra["interleaved"] = {str(n): t for n, t in timings.items()}
            text += "\n\nStep times, the three variants in one process stepped in turn:\n" + timing_table(timings)
    print(_header())
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": args.command, "args": vars(args), "header": _header(), "rows": rows, **extra}, f, indent=1)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1].startswith("{"):  # a child of `interleaved`
        print(json.dumps(_interleaved_child(json.loads(sys.argv[1]))))
        sys.exit(0)
    sys.exit(main())

