"""Runs a real TRL trainer (GRPO or DPO) on CPU for a few steps, plain or with backend "mst", and compares.

Everything is built in code, nothing is downloaded: a tiny random-weight Llama, a word-level tokenizer
over a few hundred words, an in-memory `datasets.Dataset`, a reward function in Python. Needs a venv
with TRL (tools/trl_install.sh makes one):

    bash tools/trl_install.sh                                  # /work/trl-venv, trl 1.14.2
    /work/trl-venv/bin/python tools/trl_run.py --trainer grpo --steps 3 --mode plain
    /work/trl-venv/bin/python tools/trl_run.py --trainer grpo --steps 3 --mode mst
    /work/trl-venv/bin/python tools/trl_run.py --trainer grpo --steps 3 --compare   # plain, plain, mst

Modes (`--mode`):

    plain       the trainer as it is
    mst         the log-prob computation compiled with backend "mst", the one-liner a user would write
                so that the model forward and the log-probs land in one graph:
                  GRPO: trainer._get_per_token_logps_and_entropies = torch.compile(
                            trainer._get_per_token_logps_and_entropies, backend="mst")
                  DPO:  trainer._compute_loss = torch.compile(trainer._compute_loss, backend="mst")
                        (TRL >= 1.0's DPO has no separate log-prob method on its default path: the
                        forward and selective_log_softmax(_and_entropy) are inline in _compute_loss.
                        With TRL's default gradient_checkpointing=True this dies in a RecursionError
                        (Dynamo misreads transformers' `_is_overridden`); use --gradient-checkpointing off)
                generation is not compiled (it calls the model directly, not this method)
    mst-model   torch.compile(model, backend="mst") passed to the trainer as its model (TRL >= 1.15
                patches the forward with its fused LM head and calls the backbone directly: nothing compiles)
    mst-args    the trainer's own switch: GRPOConfig/DPOConfig(torch_compile=True, torch_compile_backend="mst")
                (accelerate 1.15 rejects it: 'MST' is not a valid DynamoBackend)

`--dump-graphs DIR` (mode mst) writes each graph Dynamo hands to mst as DIR/graph_<n>.py.

`--compare` runs each of `--modes` (default plain,plain,mst) in its own process and prints, per
optimizer step, every logged metric and the exact per-micro-batch loss, with the max abs difference of
each mode to the first; and whether the generated completions and the final weights are identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings

MODES = ("plain", "mst", "mst-model", "mst-args")

# A few hundred words: the vocabulary of the tokenizer and the text of the data set.
_BASE_WORDS = (
    "the a one two three four five six seven eight nine ten red green blue cat dog bird fish tree "
    "sun moon star sky sea river hill road house door window book pen cup milk tea bread apple "
    "run walk jump sing read write eat drink sleep swim fly sit stand look see hear say tell "
    "big small hot cold old new good bad fast slow happy sad up down in out on off yes no"
).split()
_WORDS = _BASE_WORDS + [f"w{i}" for i in range(400 - len(_BASE_WORDS))]
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


# ----------------------------------------------------------------------------------------------
# model, tokenizer, data


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with a space, drops no text
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def build_model_dir(path: str, tokenizer, seed: int, hidden: int, layers: int) -> None:
    """A tiny random-weight LlamaForCausalLM, saved (with the tokenizer) so that TRL can load the
    reference model from the same local path, as it does for a hub name."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _sentence(rng, lo, hi):
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def build_dataset(trainer_name: str, n: int, seed: int):
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    if trainer_name == "grpo":
        return Dataset.from_dict({"prompt": [_sentence(rng, 3, 7) for _ in range(n)]})
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(_sentence(rng, 3, 6))
        rows["chosen"].append(" " + _sentence(rng, 2, 6))
        rows["rejected"].append(" " + _sentence(rng, 2, 6))
    return Dataset.from_dict(rows)


# The reward: how many completion words are in the first half of the vocabulary, plus a length term.
_GOOD = set(_WORDS[: len(_WORDS) // 2])
_COMPLETIONS_SEEN: list[str] = []  # a digest of each call's completions, to check generation is identical


def reward_words(prompts, completions, **kwargs):
    _COMPLETIONS_SEEN.append(hashlib.sha256(json.dumps(completions).encode()).hexdigest()[:16])
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w in _GOOD for w in words) / 4.0 - 0.1 * abs(len(words) - 6))
    return out


# ----------------------------------------------------------------------------------------------
# one run


def _config(cls, **kwargs):
    """Only the fields this TRL version's config has (the others are reported, not passed)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    dropped = sorted(k for k in kwargs if k not in fields)
    if dropped:
        print(f"[trl_run] {cls.__name__} has no field(s) {dropped}: not set", file=sys.stderr)
    return cls(**{k: v for k, v in kwargs.items() if k in fields})


class _LogRecorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def _dumping_mst_backend(folder: str):
    """backend "mst", after writing each graph Dynamo hands it to FOLDER/graph_<n>.py (as mst receives it)."""
    from mst_fx import mst_backend

    os.makedirs(folder, exist_ok=True)
    count = [0]

    def backend(gm, example_inputs, **kw):
        path = os.path.join(folder, f"graph_{count[0]}.py")
        count[0] += 1
        import torch

        header = [f"# grad mode enabled: {torch.is_grad_enabled()}"]
        for i, x in enumerate(example_inputs):
            if isinstance(x, torch.Tensor):
                header.append(f"# input {i}: {tuple(x.shape)} {x.dtype} requires_grad={x.requires_grad}")
        with open(path, "w") as f:
            f.write("\n".join(header) + "\n" + gm.print_readable(print_output=False, include_stride=False))
        return mst_backend(gm, example_inputs, **kw)

    return backend


def run_once(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback

    mst_log = _LogRecorder()
    logging.getLogger("mst_fx").addHandler(mst_log)
    logging.getLogger("mst_fx").setLevel(logging.INFO)

    tokenizer = build_tokenizer()
    work = tempfile.mkdtemp(prefix=f"trl_run_{args.trainer}_{args.mode}_")
    model_dir = os.path.join(work, "model")
    build_model_dir(model_dir, tokenizer, args.seed, args.hidden, args.layers)
    transformers.set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = build_dataset(args.trainer, n=64, seed=args.seed)

    common = dict(
        output_dir=os.path.join(work, "out"), max_steps=args.steps, logging_steps=1, learning_rate=args.lr,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, report_to="none",
        save_strategy="no", seed=args.seed, data_seed=args.seed, bf16=False, fp16=False, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, use_liger_kernel=False,
    )  # fmt: skip
    if args.gradient_checkpointing != "trl-default":
        common["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    if args.mode == "mst-args":
        common.update(torch_compile=True, torch_compile_backend="mst")

    mst = "mst"
    if args.chunk_size:  # the tiny runs fit in one chunk under "auto": force chunking to exercise the rewrite
        import mst_fx

        mst = mst_fx.backend(chunk_size=args.chunk_size)
    if args.mode == "mst-model":
        model = torch.compile(model, backend=mst)

    if args.trainer == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = _config(
            GRPOConfig, **common, num_generations=args.num_generations,
            max_completion_length=args.max_completion_length, temperature=args.temperature, beta=args.beta,
            use_vllm=False, log_completions=False,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward_words, args=config, train_dataset=dataset, processing_class=tokenizer
        )
        target = "_get_per_token_logps_and_entropies"
    else:
        from trl import DPOConfig, DPOTrainer

        config = _config(DPOConfig, **common, beta=0.1, max_length=32)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        target = "_compute_loss"

    if args.mode == "mst":
        # the one-liner: the model forward and the log-probs in one compiled function
        backend = mst if not args.dump_graphs else _dumping_mst_backend(args.dump_graphs)
        setattr(trainer, target, torch.compile(getattr(trainer, target), backend=backend))

    # the exact loss of every micro-batch, as compute_loss returns it (the logged "loss" is rounded/averaged)
    exact_losses: list[float] = []
    original_compute_loss = trainer.compute_loss

    def compute_loss(*a, **kw):
        out = original_compute_loss(*a, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        exact_losses.append(float(loss.detach()))
        return out

    trainer.compute_loss = compute_loss

    logs: list[dict] = []

    class Recorder(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_kw):
            if logs is not None:
                logs_row = {"step": state.global_step}
                logs_row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
                rows.append(logs_row)

    rows = logs
    trainer.add_callback(Recorder())

    counters_before = None
    try:
        import torch._dynamo.utils as dyn_utils

        dyn_utils.counters.clear()
        counters_before = dyn_utils.counters
    except Exception:  # noqa: BLE001
        pass

    t0 = time.perf_counter()
    error = None
    try:
        trainer.train()
    except Exception as e:  # noqa: BLE001
        import traceback

        error = "".join(traceback.format_exception(e))[-4000:]
    wall = time.perf_counter() - t0

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    state = {k.removeprefix("_orig_mod."): v.detach().float().clone() for k, v in unwrapped.state_dict().items()}
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    weights_path = os.path.join(work, "final_weights.pt")
    torch.save(state, weights_path)

    result = {
        "trainer": args.trainer, "mode": args.mode, "trl": trl.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "logs": logs, "exact_losses": exact_losses,
        "completions": list(_COMPLETIONS_SEEN), "weights_sha256": h.hexdigest()[:16],
        "weights_path": weights_path, "wall_s": round(wall, 2),
        "error": error, "mst_fx_log": list(dict.fromkeys(mst_log.lines)),
        "compiled_target": target if args.mode == "mst" else None,
    }  # fmt: skip
    if counters_before is not None:
        result["dynamo"] = {
            "graph_breaks": {str(k): v for k, v in counters_before["graph_break"].items()},
            "unique_graphs": counters_before["stats"].get("unique_graphs", 0),
            "calls_captured": counters_before["stats"].get("calls_captured", 0),
        }
    if args.mode != "plain":
        try:
            import mst_fx

            result["mst_last_report"] = str(mst_fx.last_report())
        except Exception as e:  # noqa: BLE001
            result["mst_last_report"] = f"mst_fx.last_report() failed: {type(e).__name__}: {e}"
    return result


def print_single(result: dict) -> None:
    print(f"trainer={result['trainer']} mode={result['mode']} trl={result['trl']} torch={result['torch']} "
          f"transformers={result['transformers']} wall={result['wall_s']}s")  # fmt: skip
    for row in result["logs"]:
        print("  log", json.dumps(row))
    print("  exact losses:", [repr(x) for x in result["exact_losses"]])
    print("  completions digests:", result["completions"])
    print("  final weights sha256:", result["weights_sha256"])
    if "dynamo" in result:
        print("  dynamo:", json.dumps(result["dynamo"]))
    for line in result["mst_fx_log"]:
        print("  [mst_fx log]", line)
    if result.get("mst_last_report"):
        print("  mst_fx.last_report():")
        print("    " + result["mst_last_report"].replace("\n", "\n    "))
    if result["error"]:
        print("  ERROR:\n" + result["error"])


# ----------------------------------------------------------------------------------------------
# compare


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.9g}"
    return str(v)


def compare(args) -> int:
    from tabulate import tabulate

    modes = args.modes.split(",")
    results, failed = [], []
    for i, mode in enumerate(modes):
        out = os.path.join(tempfile.mkdtemp(prefix="trl_cmp_"), f"{i}_{mode}.json")
        cmd = [sys.executable, __file__, "--trainer", args.trainer, "--steps", str(args.steps), "--mode", mode,
               "--json-out", out, "--seed", str(args.seed), "--threads", str(args.threads),
               "--num-generations", str(args.num_generations), "--max-completion-length",
               str(args.max_completion_length), "--temperature", str(args.temperature), "--beta", str(args.beta),
               "--batch", str(args.batch), "--lr", str(args.lr), "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--gradient-checkpointing", args.gradient_checkpointing,
               "--chunk-size", str(args.chunk_size)]  # fmt: skip
        print(f"[compare] running {mode} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if not os.path.exists(out):
            err = proc.stderr.strip().splitlines()
            print(f"[compare] {mode} failed before training (rc={proc.returncode}), left out of the table: "
                  f"{err[-1] if err else '?'}\n    " + "\n    ".join(err[-12:]))
            failed.append(mode)
            continue
        with open(out) as f:
            results.append(json.load(f))
        if args.verbose:
            print(proc.stderr[-5000:])

    if not results:
        return 1
    names = [f"{r['mode']}#{i}" for i, r in enumerate(results)]
    r0 = results[0]
    print(f"\ntrainer={args.trainer} trl={r0['trl']} torch={r0['torch']} transformers={r0['transformers']} "
          f"steps={args.steps}")  # fmt: skip

    # every (step, metric) any run logged
    keys = []
    for r in results:
        for row in r["logs"]:
            for k in row:
                if k != "step" and (row["step"], k) not in keys:
                    keys.append((row["step"], k))

    def get(r, step, k):
        for row in r["logs"]:
            if row["step"] == step and k in row:
                return row[k]
        return None

    table = []
    maxdiff = {n: {} for n in names[1:]}
    for step, k in keys:
        vals = [get(r, step, k) for r in results]
        line = [step, k] + [_fmt(v) for v in vals]
        for n, v in zip(names[1:], vals[1:], strict=True):
            if isinstance(vals[0], (int, float)) and isinstance(v, (int, float)):
                d = abs(v - vals[0])
                line.append(f"{d:.3g}")
                if "time" not in k and "runtime" not in k and "per_second" not in k:
                    maxdiff[n][k] = max(maxdiff[n].get(k, 0.0), d)
            else:
                line.append("-")
        table.append(line)
    n_loss = max(len(r["exact_losses"]) for r in results)
    for i in range(n_loss):
        vals = [r["exact_losses"][i] if i < len(r["exact_losses"]) else None for r in results]
        line = [f"mb{i}", "exact compute_loss"] + [_fmt(v) for v in vals]
        for n, v in zip(names[1:], vals[1:], strict=True):
            if vals[0] is not None and v is not None:
                d = abs(v - vals[0])
                line.append(f"{d:.3g}")
                maxdiff[n]["exact compute_loss"] = max(maxdiff[n].get("exact compute_loss", 0.0), d)
            else:
                line.append("-")
        table.append(line)
    headers = ["step", "metric"] + names + [f"|{n} - {names[0]}|" for n in names[1:]]
    print(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))

    print("\nmax abs difference to", names[0], "(timing metrics excluded):")
    summary = []
    for n in names[1:]:
        md = maxdiff[n]
        worst = max(md.items(), key=lambda kv: kv[1] if not math.isnan(kv[1]) else math.inf, default=("-", 0.0))
        summary.append([n, f"{worst[1]:.3g}", worst[0], f"{md.get('loss', float('nan')):.3g}",
                        f"{md.get('exact compute_loss', float('nan')):.3g}"])  # fmt: skip
    print(tabulate(summary, headers=["run", "max |diff| any metric", "(metric)", "logged loss", "exact loss"],
                   tablefmt="github", disable_numparse=True))  # fmt: skip

    import torch

    w0 = torch.load(r0["weights_path"])

    def weights_diff(r):
        w = torch.load(r["weights_path"])
        if w.keys() != w0.keys():
            return "different parameter names"
        worst = max(((float((w[k] - w0[k]).abs().max()), k) for k in w0), default=(0.0, "-"))
        return f"max |dw| {worst[0]:.3g} ({worst[1]})"

    print("\nidentity checks against", names[0])
    for n, r in zip(names, results, strict=True):
        print(f"  {n:12s} completions {'same' if r['completions'] == r0['completions'] else 'DIFFERENT'}"
              f" ({len(r['completions'])} reward calls), final weights {r['weights_sha256']}"
              f" {'same' if r['weights_sha256'] == r0['weights_sha256'] else 'DIFFERENT'} ({weights_diff(r)}"
              f"{', run errored: weights as left' if r['error'] else ''}),"
              f" wall {r['wall_s']}s"
              + (f", dynamo {json.dumps(r['dynamo'])}" if r.get("dynamo") and r["mode"] != "plain" else ""))  # fmt: skip
    for n, r in zip(names, results, strict=True):
        if r["mst_fx_log"]:
            print(f"\n[{n}] logger mst_fx said:")
            for line in r["mst_fx_log"]:
                print("  ", line)
        if r.get("mst_last_report"):
            print(f"\n[{n}] mst_fx.last_report():")
            print("   " + r["mst_last_report"].replace("\n", "\n   "))
        if r["error"]:
            print(f"\n[{n}] ERROR:\n{r['error']}")
    return 1 if failed or any(r["error"] for r in results) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=("grpo", "dpo"), default="grpo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mode", choices=MODES, default="plain")
    p.add_argument("--compare", action="store_true", help="run --modes in subprocesses and compare")
    p.add_argument("--modes", default="plain,plain,mst", help="for --compare: comma-separated modes")
    p.add_argument("--json-out", help="write the run's result as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine has 2 cores)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.7, help="GRPO sampling and log-prob temperature")
    p.add_argument("--beta", type=float, default=0.04, help="GRPO KL coefficient (>0: a reference model)")
    p.add_argument("--batch", type=int, default=4, help="per-device train batch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--gradient-checkpointing", choices=("trl-default", "on", "off"), default="trl-default",
                   help="TRL's configs default to gradient_checkpointing=True (HF non-reentrant checkpoint)")
    p.add_argument("--chunk-size", type=int, default=0, help="mst modes: options chunk_size (0: 'auto')")
    p.add_argument("--dump-graphs", metavar="DIR", help="mode mst: write each graph mst is handed to DIR")
    p.add_argument("--verbose", action="store_true", help="for --compare: show each run's stderr tail")
    args = p.parse_args(argv)

    if args.compare:
        return compare(args)
    warnings.filterwarnings("ignore", category=FutureWarning)
    result = run_once(args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    print_single(result)
    return 0 if result["error"] is None else 2


if __name__ == "__main__":
    sys.exit(main())
