"""Plot peak training-step memory against tokens for each variant, from seq_bench's JSON output.

    python tools/seq_bench.py max-length --json docs/max_length.json
    python tools/seq_bench.py throughput --tokens 1024,2048,8192 --json docs/throughput.json
    python tools/plot_memory.py docs/memory_vs_tokens.png docs/max_length.json docs/throughput.json

Every measured step is a point: each max-length probe that finished its measured step (one the
watchdog ended has no figure, only "did not fit") and each throughput run (no budget there). The
dashed line is the max-length budget; each variant's longest fitting length is circled. Needs
matplotlib: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

MARKERS = {"eager": "s", "inductor": "o", "inductor+ckpt": "D", "mst": "^", "mst+ckpt": "v"}


def load(paths: list[str]) -> tuple[dict, dict[str, dict[int, float]], dict[str, dict]]:
    """(the max-length run's args, {variant: {tokens: peak MB}}, {variant: its max-length search})."""
    points: dict[str, dict[int, float]] = defaultdict(dict)
    searches, args = {}, None
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        if payload.get("command") == "max-length":
            args = payload["args"]
            for search in payload["searches"]:
                searches[search["variant"]] = search
                done = [p for p in search["probes"] if p["peak_mb"] is not None]
                points[search["variant"]].update({p["tokens"]: p["peak_mb"] for p in done})
        elif payload.get("command") == "throughput":
            args = args or payload["args"]
            for run in payload["runs"]:
                points[run["variant"]].setdefault(run["tokens"], run["peak_mb"])
        else:
            raise SystemExit(f"{path}: not the JSON of `seq_bench.py max-length|throughput --json`")
    if args is None:
        raise SystemExit("no input")
    return args, points, searches


def plot(args: dict, points: dict, searches: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, by_tokens in points.items():
        tokens = sorted(by_tokens)
        peaks = [by_tokens[t] for t in tokens]
        marker = MARKERS.get(variant, "o")
        (line,) = ax.plot(tokens, peaks, marker=marker, label=_label(variant, searches.get(variant)))
        longest = searches.get(variant, {}).get("max_tokens")
        if longest in by_tokens:
            ax.plot(
                [longest], [by_tokens[longest]], marker="o", markersize=14, fillstyle="none", color=line.get_color()
            )
    if "budget_mb" in args:
        ax.axhline(
            args["budget_mb"], linestyle="--", color="gray", label=f"max-length budget {args['budget_mb']:.0f} MB"
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.set_xlabel("tokens (batch 1)")
    ax.set_ylabel("peak memory over a training step (MB, rise of VmHWM)")
    ax.set_title(
        f"Llama-shaped: hidden {args['hidden']}, intermediate {args['intermediate']}, "
        f"{args['layers']} layers, vocab {args['vocab']}; CPU fp32",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _label(variant: str, search: dict | None) -> str:
    if search is None:
        return variant
    bound = "≥ " if search["first_failing"] is None else ""
    return f"{variant} (fits {bound}{search['max_tokens']} tokens)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("png", help="where to write the plot")
    p.add_argument("json", nargs="+", help="outputs of `seq_bench.py max-length|throughput --json`")
    args = p.parse_args(argv)
    plot(*load(args.json), args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
