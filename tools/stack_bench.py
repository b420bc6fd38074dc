"""mst on third-party training stacks, run the way their own trainers run a training step.

    cd tools && /work/stacks-venv/bin/python stack_bench.py                 # both stacks, eager/inductor/mst
    /work/stacks-venv/bin/python stack_bench.py --stacks litgpt --tokens 8192
    /work/stacks-venv/bin/python stack_bench.py --stacks x-transformers --tokens 512
    /work/stacks-venv/bin/python stack_bench.py --check                     # loss and gradient parity with eager

Stacks (tests/third_party_stacks.py builds them and says which trainer code each step follows):
torchtitan 0.3.0 (blocks compiled one by one, head and loss outside, loss compiled on its own),
torchtitan-chunked (the same with its ChunkedLossWrapper, its llama3 configs' default loss),
litgpt 0.5.13 (whole model compiled, chunked_cross_entropy outside) and x-transformers 2.31.10
(its AutoregressiveWrapper compiled whole, its stable cross_entropy inside; GELU-GLU feed-forwards,
4x wide). Install them with tools/stacks_install.sh. Variants: eager (no compile), inductor (the
trainer's compile calls), mst (the same calls with backend="mst"), mst-lean (mst with
memory_budget="off": every site chunked and recomputed; for the stacks that call torch.compile
themselves, litgpt and x-transformers), mst+head (mst after `apply_mst_head_recipe`).

Each variant runs in its own process (tools/step_runner.py): two warm-up steps (the first compiles,
the second is the first the memory budget's "auto" plans from a measurement), then the measured
steps; CPU peak is the rise of VmHWM over the first measured step, with MALLOC_MMAP_THRESHOLD_=65536,
as in the rest of tools/.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import sys
import tempfile

from step_runner import measure, run_script_in_child
from tabulate import tabulate

VARIANTS = ("eager", "inductor", "mst", "mst-lean", "mst+head")
STACKS = ("torchtitan", "torchtitan-chunked", "torchtitan-moe", "litgpt", "x-transformers")
RTOL = 1e-4  # parity: fp32, an error up to RTOL of the largest reference value passes


@functools.cache
def load_stacks():
    """tests/third_party_stacks.py, imported by path (tests/ is no package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "third_party_stacks.py")
    spec = importlib.util.spec_from_file_location("third_party_stacks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the head recipe (to be written)


def apply_mst_head_recipe(stack: str, model):
    """The README's one line for a stack that runs its head outside every compiled graph: compile
    the head alone with mst, so that it returns DeferredLogits and the stack's own loss runs chunked
    on them. litgpt compiles the whole model, head included, and x-transformers the whole wrapper,
    head and loss included: nothing to add there."""
    if stack.startswith("torchtitan"):
        import mst_fx

        mst_fx.compile(model.lm_head)  # torchtitan 0.3 names its head lm_head
    return model


def build_variant(payload: dict):
    """(stack, step_model, loss_fn) for one variant, after the trainer's compile calls."""
    stacks = load_stacks()
    name, variant = payload["stack"], payload["variant"]
    shape = {k: payload[k] for k in ("hidden", "layers", "vocab", "seed")} | payload.get("stack_options", {})
    if name == "torchtitan-moe":  # Qwen3-MoE blocks at Qwen3-30B-A3B's ratios: top-8 of 16, k·I/d = 3
        hidden = shape.pop("hidden")
        sizes = {"dim": hidden, "moe_hidden": 3 * hidden // 8, "experts": 16, "top_k": 8}
        stack = stacks.build_torchtitan_moe(payload["tokens"], **sizes, **shape)
    elif name.startswith("torchtitan"):
        shape["loss"] = "chunked" if name == "torchtitan-chunked" else "ce"
        stack = stacks.build_torchtitan(payload["tokens"], **shape)
    elif name == "x-transformers":  # x-transformers calls the width dim
        stack = stacks.build_x_transformers(payload["tokens"], dim=shape.pop("hidden"), **shape)
    else:
        stack = stacks.build_litgpt(payload["tokens"], **shape)
    model = apply_mst_head_recipe(name, stack.model) if variant == "mst+head" else stack.model
    backend = {"eager": None, "inductor": "inductor"}.get(variant, "mst")
    if variant == "mst-lean":  # the budget off: every site chunked and recomputed (litgpt, x-transformers)
        import mst_fx

        backend = mst_fx.backend(memory_budget="off")
    extra = {"loss_backend": payload["loss_backend"]} if name.startswith("torchtitan") else {}
    step_model, loss_fn = stack.compile_model_fn(model, backend, **extra)
    return stack, step_model, loss_fn  # gradients are read off stack.model: a recipe may wrap it


def child_main(payload: dict) -> dict:
    import torch

    stacks = load_stacks()
    stack, step_model, loss_fn = build_variant(payload)

    def step() -> float:
        loss = stacks.training_step(step_model, stack.inputs, stack.labels, loss_fn)
        if payload.get("grads_to"):  # --check: this step's gradients, for the parent to compare
            torch.save({n: p.grad for n, p in stack.model.named_parameters()}, payload["grads_to"])
        stack.model.zero_grad(set_to_none=True)  # the trainer's optimizers.zero_grad()
        return loss.item()

    if payload.get("grads_to"):
        return {"losses": [step()]}
    return measure(step, payload["steps"], warmup=payload.get("warmup", 2))


# ---------------------------------------------------------------- the parent


def run_variant(args, stack: str, variant: str, grads_to: str | None = None) -> dict:
    payload = {
        "stack": stack, "variant": variant, "tokens": args.tokens, "hidden": args.hidden, "layers": args.layers,
        "vocab": args.vocab, "seed": args.seed, "steps": args.steps, "warmup": args.warmup, "loss_backend": args.loss_backend,
        "stack_options": dict(_option(o) for o in args.stack_option),
        "grads_to": grads_to,
    }  # fmt: skip
    print(f"{stack}: {variant} ...", file=sys.stderr, flush=True)
    try:
        return run_script_in_child(os.path.abspath(__file__), payload, args.timeout, f"{stack} {variant}")
    except Exception as error:  # one failed variant is reported in the table, not fatal
        return {"error": last_line(str(error))}


def _option(text: str) -> tuple[str, object]:
    """`key=value` with the value read as a Python literal (True, 4, 'x'), or as text."""
    import ast

    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    return (errors or lines or ["no output"])[-1][:300]


def bench_table(results: dict) -> str:
    base = results.get("inductor", {})
    rows = []
    for variant, r in results.items():
        if "error" in r:
            rows.append([variant, "-", "-", "-", "-", f"failed: {r['error']}"])
            continue
        rows.append([
            variant, f"{r['peak_mb']:.0f}", ratio(r["peak_mb"], base.get("peak_mb")),
            f"{r['step_s']:.2f}", ratio(r["step_s"], base.get("step_s")), f"{r['losses'][-1]:.6f}",
        ])  # fmt: skip
    headers = ["variant", "peak MiB", "peak vs inductor", "step s", "time vs inductor", "loss"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def ratio(value, base) -> str:
    return f"{value / base:.2f}x" if base else "-"


def compare_grads(reference: dict, grads: dict) -> dict:
    """Worst parameter by max|g - ref| / max|ref|, and whether every parameter is within RTOL."""
    if reference.keys() != grads.keys():
        return {"worst": float("inf"), "param": "parameter names differ", "missing": 0, "ok": False}
    errors, missing = {}, [n for n in reference if (reference[n] is None) != (grads[n] is None)]
    for name, ref in reference.items():
        if ref is not None and grads[name] is not None:
            errors[name] = ((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    worst = max(errors, key=errors.get)
    ok = not missing and errors[worst] <= RTOL
    return {"worst": errors[worst], "param": worst, "missing": len(missing), "ok": ok}


def check_stack(args, stack: str, variants: list[str]) -> list[list]:
    """One step per variant from the same seed; loss and every gradient against eager's."""
    import torch

    with tempfile.TemporaryDirectory(prefix="stack-check-") as tmp:
        runs = {v: (run_variant(args, stack, v, f"{tmp}/{v}.pt"), f"{tmp}/{v}.pt") for v in ["eager", *variants]}
        eager, eager_path = runs.pop("eager")
        if "error" in eager:
            return [[v, "-", "-", "-", f"eager failed: {eager['error']}"] for v in variants]
        reference = torch.load(eager_path)
        rows = []
        for variant, (r, path) in runs.items():
            if "error" in r:
                rows.append([variant, "-", "-", "-", f"failed: {r['error']}"])
                continue
            c = compare_grads(reference, torch.load(path))
            loss_err = abs(r["losses"][0] - eager["losses"][0]) / abs(eager["losses"][0])
            ok = c["ok"] and loss_err <= RTOL
            compared = f"{len(reference)} ({c['missing']} missing)"
            verdict = f"{'ok' if ok else 'FAIL'} (worst: {c['param']})"
            rows.append([variant, f"{loss_err:.1e}", f"{c['worst']:.1e}", compared, verdict])
    return rows


def header(args, stack: str) -> str:
    import torch

    return (
        f"stack={stack} tokens=1x{args.tokens} hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
        f"fp32 torch={torch.__version__} machine={platform.machine()} cores={len(os.sched_getaffinity(0))}"
        + (f" loss_backend={args.loss_backend}" if stack.startswith("torchtitan") else "")
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stacks", default="torchtitan,litgpt", help=f"comma-separated, of {','.join(STACKS)}")
    p.add_argument("--tokens", type=int, default=4096, help="sequence length (batch 1)")
    p.add_argument("--hidden", type=int, default=256,
                   help="model width; the MLP is the Llama-3 rule's (768 at 256), x-transformers' 4x")  # fmt: skip
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--variants", default="eager,inductor,mst", help=f"comma-separated, of {','.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up steps")
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up steps: the first compiles; under memory_budget='auto' the second compiles what keeping needs")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-backend", default="same", choices=["same", "inductor", "eager"],
                   help="torchtitan: what compiles its loss fn; 'same', the trainer's, is the model's")  # fmt: skip
    p.add_argument("--stack-option", dest="stack_option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the stack's builder (x-transformers: a Decoder option, e.g. attn_flash=True)")  # fmt: skip
    p.add_argument("--check", action="store_true", help="parity of the loss and every gradient with eager")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per variant")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    args.loss_backend = None if args.loss_backend == "eager" else args.loss_backend
    for value, allowed in ((args.stacks, STACKS), (args.variants, VARIANTS)):
        if bad := set(value.split(",")) - set(allowed):
            p.error(f"unknown {sorted(bad)}; choose from {','.join(allowed)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    variants, out = args.variants.split(","), {}
    for stack in args.stacks.split(","):
        print(header(args, stack))
        if args.check:
            rows = check_stack(args, stack, [v for v in variants if v != "eager"])
            out[stack] = rows
            headers = ["variant", "loss rel err", "max grad rel err", "params compared", "parity"]
            print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
        else:
            out[stack] = {v: run_variant(args, stack, v) for v in variants}
            print(bench_table(out[stack]))
        print(flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(json.dumps(child_main(json.loads(sys.argv[1]))))
    else:
        sys.exit(main())
