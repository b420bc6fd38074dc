"""GRPO-style loss benchmark: peak memory and step time of one training step, mst against Inductor
and against log-prob loops written the way RL libraries write them. Each variant in its own process.

    python tools/rl_bench.py --tokens 8192,32768           # docs/benchmarks.md §9

The model is the docs' Llama-shaped one (hidden 512, intermediate 2048, 2 layers, vocab 32000,
random weights); the step is `mst_fx.models.GRPOStep`: per-token log-probs of the completion at a
temperature, the clipped surrogate over a completion mask, and the entropy a trainer logs (no
gradient). Tokens are completion tokens in sequences of --sequence-tokens each. Variants:

  inductor        the whole step compiled by Inductor
  mst             the whole step compiled by mst: the head and its log-probs are one per-token site
  trl-loop        the model compiled by Inductor returns its logits; log-probs and entropy are
                  TRL's loops (`selective_log_softmax`: gather, then logsumexp row by row;
                  `entropy_from_logits` in chunks of rows), eager
  mst-trl-loop    the same loops on the model compiled by mst: its logits come back deferred
  hand-chunked    the model body compiled by Inductor returns hidden states; the head, log-softmax
                  and gather run per chunk of --chunk tokens under torch.utils.checkpoint (what
                  memory-conscious RL code writes by hand), eager

CPU peak is the rise of VmHWM over the measured step (MALLOC_MMAP_THRESHOLD_=65536, peak reset by
clear_refs), as in tools/step_runner.py; ratios are to Inductor in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
from tabulate import tabulate

from step_runner import measure, run_script_in_child

VARIANTS = ("inductor", "mst", "trl-loop", "mst-trl-loop", "hand-chunked")


def build_step(variant: str, step, chunk: int):
    """A function of the batch returning (loss, mean entropy) for `variant`."""
    from mst_fx import models

    model = step.model
    if variant in ("inductor", "mst"):
        return torch.compile(step, backend=variant)
    if variant in ("trl-loop", "mst-trl-loop"):
        compiled = torch.compile(model, backend="inductor" if variant == "trl-loop" else "mst")

        def trl_loop(ids, mask, advantages, old_logps):
            logits = compiled(ids, use_cache=False).logits[:, :-1, :] / step.temperature
            logps = models.trl_selective_log_softmax(logits, ids[:, 1:])
            with torch.no_grad():
                entropy = models.trl_entropy_from_logits(logits)
            loss = models.grpo_objective(logps, mask, advantages, old_logps, step.epsilon)
            return loss, models.masked_mean(entropy, mask)

        return trl_loop
    body = torch.compile(model.model, backend="inductor")
    head = model.lm_head

    def chunk_fn(hidden, ids):
        logits = head(hidden) / step.temperature
        logps = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logps.exp() * logps).sum(-1).detach()
        return logps.gather(-1, ids[..., None]).squeeze(-1), entropy

    def hand_chunked(ids, mask, advantages, old_logps):
        hidden = body(ids, use_cache=False).last_hidden_state[:, :-1, :].reshape(-1, head.in_features)
        targets = ids[:, 1:].reshape(-1)
        parts = [
            torch.utils.checkpoint.checkpoint(chunk_fn, h, t, use_reentrant=False)
            for h, t in zip(hidden.split(chunk), targets.split(chunk))
        ]
        logps = torch.cat([p[0] for p in parts]).view(mask.shape)
        entropy = torch.cat([p[1] for p in parts]).view(mask.shape)
        loss = models.grpo_objective(logps, mask, advantages, old_logps, step.epsilon)
        return loss, models.masked_mean(entropy, mask)

    return hand_chunked


def child_main(payload: dict) -> dict:
    from mst_fx import models

    torch.manual_seed(0)
    model = models.tiny_llama(payload["hidden"], payload["intermediate"], payload["layers"], payload["vocab"])
    step = models.GRPOStep(model)
    sequences = payload["tokens"] // payload["sequence_tokens"]
    batch = models.grpo_batch(payload["vocab"], sequences, payload["sequence_tokens"])
    run = build_step(payload["variant"], step, payload["chunk"])
    entropies = []

    def one_step() -> float:
        loss, entropy = run(*batch)
        loss.backward()
        entropies.append(entropy.item())
        model.zero_grad(set_to_none=True)
        return loss.item()

    result = measure(one_step, payload["steps"])
    return {**result, "entropy": entropies[-1]}


def run_variant(args, tokens: int, variant: str) -> dict:
    payload = {
        "variant": variant, "tokens": tokens, "sequence_tokens": args.sequence_tokens, "hidden": args.hidden,
        "intermediate": args.intermediate, "layers": args.layers, "vocab": args.vocab, "chunk": args.chunk,
        "steps": args.steps,
    }  # fmt: skip
    print(f"{tokens} tokens: {variant} ...", file=sys.stderr, flush=True)
    try:
        return run_script_in_child(os.path.abspath(__file__), payload, args.timeout, variant)
    except Exception as error:  # one failed variant is a row of the table, not the end of the run
        return {"error": str(error).strip().splitlines()[-1][:200]}


def table(results: dict) -> str:
    rows = []
    for (tokens, variant), r in results.items():
        base = results.get((tokens, "inductor"), {})
        if "error" in r:
            rows.append([tokens, variant, "-", "-", "-", "-", "-", f"failed: {r['error']}"])
            continue
        rows.append([
            tokens, variant, f"{r['peak_mb']:.0f}", _ratio(r["peak_mb"], base.get("peak_mb")), f"{r['step_s']:.2f}",
            _ratio(r["step_s"], base.get("step_s")), f"{r['losses'][-1]:.6f}", f"{r['entropy']:.4f}",
        ])  # fmt: skip
    headers = ["tokens", "variant", "peak MiB", "peak vs inductor", "step s", "time vs inductor", "loss", "entropy"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if base else "-"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="8192,32768", help="completion tokens per step, comma-separated")
    p.add_argument("--sequence-tokens", type=int, default=2048, help="completion tokens per sequence")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the hand-chunked loop")
    p.add_argument("--steps", type=int, default=1, help="measured steps after the warm-up")
    p.add_argument("--timeout", type=float, default=1800)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        print(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}", file=sys.stderr)
        return 2
    results = {(t, v): run_variant(args, t, v) for t in map(int, args.tokens.split(",")) for v in variants}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"llama hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} vocab={args.vocab}, "
          f"{args.sequence_tokens} tokens per sequence, fp32, {args.steps} measured step(s)")  # fmt: skip
    print(table(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        import json

        print(json.dumps(child_main(json.loads(sys.argv[1]))))
    else:
        sys.exit(main())
