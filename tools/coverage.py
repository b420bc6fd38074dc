"""Coverage across architectures: which Hugging Face causal-LM families mst rewrites, with parity.

    python tools/coverage.py                          # every family; writes docs/coverage.md
    python tools/coverage.py --families llama,gpt2    # a few; prints the table, writes no file

For each model type in transformers' causal-LM mapping, in its own process (a crash or a hang in
one family can't stop the sweep): build the family from a tiny config with random weights
(`mst_fx.models.tiny_configs`), run one training step eagerly and one under
`torch.compile(backend=mst_fx.backend(compiler="aot_eager", chunks=4))` on a copy with the same
weights, and record the MLP sites found and rewritten, whether the LM head was rewritten, loss and
gradient parity, and why each site left alone was left alone. Exits 1 when a family whose rewrite
ran differs from eager.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "coverage.md")
BATCH, TOKENS, CHUNKS = 2, 16, 4
# fp32. The chunked sites sum the same products in another order, and AOTAutograd decomposes
# some ops differently from eager: that moves a gradient by ~1e-6 relative after two layers. A
# wrong chunk, a lost scale or a missing token moves it by O(1). rtol 1e-4 sits in between with
# room for the deeper hybrids; atol 1e-5 keeps gradients near zero from failing on noise.
RTOL, ATOL = 1e-4, 1e-5
DEFAULT_TIMEOUT = 300  # seconds per family; a tiny family takes 5-15 s
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclasses.dataclass
class FamilyResult:
    family: str
    status: str  # "ran", "not built", "error", "timeout"
    model_class: str = ""
    layers: int = 0
    mlp_found: int = 0
    mlp_rewritten: int = 0
    experts_found: int = 0  # routed-expert sites the experts pass found (rewritten or left alone)
    experts_rewritten: int = 0
    masks_found: int = 0  # attention masks the attention pass found (one per mask, shared by its layers)
    masks_rewritten: int = 0
    mask_forms: list[str] = dataclasses.field(default_factory=list)  # the terms read, per rewritten mask
    lm_head: bool = False
    rewritten: bool = False  # any site rewritten
    parity: bool | None = None
    loss_error: float | None = None
    grad_error: float | None = None  # max |g - g_eager| over every parameter
    grad_worst: str = ""  # the parameter with the largest error relative to the tolerance
    plain_compile_parity: bool | None = None  # on a parity failure: does unrewritten aot_eager differ too?
    fp64_errors: list[float] | None = None  # off by the tolerance: [eager's, mst's] error against fp64 eager
    moe: bool = False
    graphs: int = 0
    graph_breaks: list[str] = dataclasses.field(default_factory=list)
    left_alone: list[str] = dataclasses.field(default_factory=list)  # "kind at location: reason"
    warnings: list[str] = dataclasses.field(default_factory=list)  # mst's warnings: a pass or the compiler failed
    note: str = ""
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every MLP site rewritten, at least one per layer (shared experts and multi-token-prediction
        layers add more), and the LM head, with parity."""
        every_mlp = self.mlp_rewritten == self.mlp_found >= self.layers  # 0 layers: a Mamba has no MLP
        return bool(self.parity and self.lm_head and every_mlp)

    @property
    def parity_failed(self) -> bool:
        return self.rewritten and self.parity is False


# ---------------------------------------------------------------- child: one family, one process


def run_family(family: str, stage: list[str]) -> FamilyResult:
    """Build `family`, step it eagerly and under mst, compare; runs inside the child process.

    `stage[0]` says how far it got, for the report of an exception."""
    import mst_fx
    from mst_fx.models import random_batch, tiny_configs

    stage[0] = "building the model"
    model = tiny_configs.tiny_model(family)
    pristine = copy.deepcopy(model)
    inputs = random_batch(model.config.get_text_config().vocab_size, BATCH, TOKENS, ignore_every=7)
    stage[0] = "the eager step"
    reference = copy.deepcopy(model)
    expected = _step(reference, inputs)
    stage[0] = "the compiled step"
    mst_fx.clear_reports()
    got = _step(_compiled(model), inputs)

    result = FamilyResult(family, "ran", type(model).__name__, tiny_configs.mlp_layer_count(family, model.config))
    _record_sites(result, mst_fx.compiled_reports())
    _record_parity(result, got, expected, model, reference)
    result.graph_breaks = _graph_breaks()
    result.moe = _is_moe(model.config)
    if result.parity is False and not result.grad_worst.endswith("(gradient only in one run)"):
        stage[0] = "the fp64 eager step"
        _judge_against_fp64(result, pristine, inputs, model, reference)
    if result.parity is False:
        stage[0] = "the compiled step without rewrites"
        result.plain_compile_parity = _plain_compile_parity(reference, inputs, expected)
    return result


def _compiled(model, **options):
    import torch

    import mst_fx

    torch._dynamo.reset()
    return torch.compile(model, backend=mst_fx.backend(compiler="aot_eager", chunks=CHUNKS, **options))


def _step(model, inputs):
    """Loss of one training step, after backward; the same RNG state for every run."""
    import torch

    torch.manual_seed(0)
    ids, labels = inputs
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach()


def _record_sites(result: FamilyResult, reports) -> None:
    from mst_fx.passes.written_attention import is_written_attention

    # A graph compiled again reports the same sites again; a block whose weights are shared by
    # several layers (Zamba) reports them once per layer within one graph, which counts.
    unique = {tuple((s.kind, s.location, s.rewritten, s.reason) for s in r.sites): r for r in reports}
    sites = [s for r in unique.values() for s in r.sites]
    result.graphs = len(reports)
    mlps = [s for s in sites if s.kind.startswith("mlp")]
    result.mlp_found = len(mlps)
    result.mlp_rewritten = sum(s.rewritten for s in mlps)
    experts = [s for s in sites if s.kind == "moe experts"]
    result.experts_found, result.experts_rewritten = len(experts), sum(s.rewritten for s in experts)
    masks = [s for s in sites if s.kind == "attention" and not is_written_attention(s)]  # masks, not attention written out
    result.masks_found, result.masks_rewritten = len(masks), sum(s.rewritten for s in masks)
    result.mask_forms = sorted({s.mask for s in masks if s.rewritten and s.mask})
    result.lm_head = any(s.rewritten for s in sites if s.kind == "lm_head")
    result.rewritten = any(s.rewritten for s in sites)
    result.left_alone = [f"{s.kind} at {s.location}: {s.reason}" for s in sites if not s.rewritten]


def _record_parity(result: FamilyResult, got, expected, model, reference) -> None:
    import torch

    result.loss_error = float((got - expected).abs())
    parity = bool(torch.isclose(got, expected, rtol=RTOL, atol=0, equal_nan=True))
    grad_error, worst, worst_ratio = 0.0, "", 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if (p.grad is None) != (q.grad is None):
            parity, worst, worst_ratio = False, f"{name} (gradient only in one run)", float("inf")
            continue
        if p.grad is None:
            continue
        diff = (p.grad - q.grad).abs()
        grad_error = max(grad_error, float(diff.max()))
        ratio = float((diff / (ATOL + RTOL * q.grad.abs())).max())  # <= 1: within tolerance
        if ratio > worst_ratio:
            worst, worst_ratio = name, ratio
    result.grad_error = grad_error
    result.grad_worst = worst
    result.parity = parity and worst_ratio <= 1.0


def _judge_against_fp64(result: FamilyResult, pristine, inputs, model, reference) -> None:
    """Some families' fp32 gradients are themselves off from exact by more than the tolerance; then
    mst and eager differ by rounding alone. Both are measured against the same step in fp64 (max
    over parameters of max|g - g64| / max|g64|): mst is within rounding when its error is at most
    twice eager's."""
    try:
        exact = copy.deepcopy(pristine).double()
        _step(exact, inputs)
    except Exception:  # a family that can't run in fp64 keeps its verdict
        return
    errors = [_relative_error(run, exact) for run in (reference, model)]
    result.fp64_errors = errors
    result.parity = errors[1] <= 2 * errors[0]


def _relative_error(run, exact) -> float:
    worst = 0.0
    for p, q in zip(run.parameters(), exact.parameters()):
        if p.grad is not None and q.grad is not None and q.grad.abs().max() > 0:
            worst = max(worst, float((p.grad.double() - q.grad).abs().max() / q.grad.abs().max()))
    return worst


def _plain_compile_parity(reference, inputs, expected) -> bool:
    """Whether the same compile with every rewrite off matches eager: tells mst's errors from the compiler's."""
    model = copy.deepcopy(reference)
    model.zero_grad(set_to_none=True)
    fresh_reference = copy.deepcopy(model)
    _step(fresh_reference, inputs)
    got = _step(_compiled(model, mlp=False, lm_head=False, attention=False, experts=False), inputs)
    probe = FamilyResult("", "ran")
    _record_parity(probe, got, expected, model, fresh_reference)
    return bool(probe.parity)


def _fails_without_rewrites(family: str) -> str | None:
    """The error of the compiled step with both rewrites off, if it fails too."""
    from mst_fx.models import random_batch, tiny_configs

    model = tiny_configs.tiny_model(family)
    inputs = random_batch(model.config.get_text_config().vocab_size, BATCH, TOKENS, ignore_every=7)
    try:
        _step(_compiled(model, mlp=False, lm_head=False), inputs)
    except Exception as error:  # noqa: BLE001 (whatever it raises is the finding)
        return f"{type(error).__name__}: {_first_line(error)}"
    return None


def _graph_breaks() -> list[str]:
    from torch._dynamo.utils import counters

    return [f"{reason} (x{count})" for reason, count in counters["graph_break"].items()]


def _is_moe(config) -> bool:
    configs = [config, getattr(config, "ffn_config", None)]
    return any(isinstance(getattr(c, f, None), int) and getattr(c, f) > 0 for c in configs for f in _MOE_FIELDS)


class _Warnings(logging.Handler):
    """mst's warnings (a pass that raised, a rewritten graph the compiler rejected), first lines."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = _short(record.getMessage().splitlines()[0], 300)
        if line not in self.lines:
            self.lines.append(line)


def child_main(family: str) -> int:
    warnings = _Warnings()
    logging.getLogger("mst_fx").addHandler(warnings)
    started, stage = time.perf_counter(), [""]
    try:
        result = run_family(family, stage)
    except Exception as error:  # noqa: BLE001 (the family did not run: report why, the sweep goes on)
        note = f"{stage[0]} failed: {type(error).__name__}: {_first_line(error)}"
        if stage[0] == "the compiled step":
            plain = _fails_without_rewrites(family)
            same = plain is not None and plain.split(":")[0] == type(error).__name__
            note += " (the same without the rewrites)" if same else f" (without the rewrites: {plain or 'runs'})"
        result = FamilyResult(family, "error", note=note)
    result.warnings = warnings.lines
    result.seconds = time.perf_counter() - started
    print(json.dumps(dataclasses.asdict(result)))
    return 0


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


# ---------------------------------------------------------------- parent: the sweep and the doc


def sweep(families: list[str], timeout: float, verbose: bool) -> list[FamilyResult]:
    from mst_fx.models.tiny_configs import why_not_built

    results = []
    for number, family in enumerate(families, 1):
        reason = why_not_built(family)
        if reason is not None:
            result = FamilyResult(family, "not built", note=reason)
        else:
            result = run_in_child(family, timeout)
        results.append(result)
        if verbose:
            print(
                f"[{number}/{len(families)}] {family}: {_status_text(result)} ({result.seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return results


def run_in_child(family: str, timeout: float) -> FamilyResult:
    started = time.perf_counter()
    command = [sys.executable, os.path.abspath(__file__), "--child", family]
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return FamilyResult(family, "timeout", note=f"no result within {timeout:.0f} s", seconds=timeout)
    lines = done.stdout.strip().splitlines()
    try:
        return FamilyResult(**json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError):
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return FamilyResult(
            family, "error", note=f"the process died: {tail[0][:300]}", seconds=time.perf_counter() - started
        )


def _status_text(r: FamilyResult) -> str:
    if r.status != "ran":
        return f"{r.status}: {r.note}"
    parity = "parity" if r.parity else "PARITY FAILED" if r.parity_failed else "differs (nothing rewritten)"
    return f"MLP {r.mlp_rewritten}/{r.mlp_found}/{r.layers}, head {'yes' if r.lm_head else 'no'}, {parity}"


def summary_line(results: list[FamilyResult]) -> str:
    built = [r for r in results if r.status == "ran"]
    complete = [r for r in built if r.complete]
    partial = [r for r in built if r.rewritten and r.parity and not r.complete]
    failed = [r for r in built if r.parity_failed]
    not_built = sum(r.status == "not built" for r in results)
    errors = sum(r.status in ("error", "timeout") for r in results)
    share = f"{100 * len(complete) / len(built):.0f}%" if built else "-"
    moe = [r for r in built if r.moe]
    experts = (
        f"; of {len(moe)} mixture-of-experts families, {sum(r.experts_found > 0 and r.experts_rewritten == r.experts_found for r in moe)} "
        f"have every routed-expert site rewritten, {sum(r.experts_found == 0 for r in moe)} none found"
        if moe else ""
    )
    masked = [r for r in built if r.masks_found]
    beyond_causal = [r for r in masked if any(f != "causal" for f in r.mask_forms)]
    masks = (
        f"; of {len(masked)} families that build an attention mask, {sum(r.masks_rewritten == r.masks_found for r in masked)} "
        f"run every mask without it ({len(beyond_causal)} with terms beyond causal: windows, chunks, ...)"
        if masked else ""
    )
    return (
        f"{len(results)} families: {len(built)} built and run, {not_built} not built, {errors} errors; "
        f"{len(complete)} of {len(built)} ({share}) fully rewritten (every layer's MLP and the LM head) "
        f"with parity, {len(partial)} partly rewritten with parity, {len(failed)} parity failures{experts}{masks}"
    )


def table(results: list[FamilyResult]) -> str:
    from tabulate import tabulate

    rows = [[r.family, r.model_class, _mlp_cell(r), _experts_cell(r), _head_cell(r), _masks_cell(r), _parity_cell(r), _notes(r)]
            for r in results]  # fmt: skip
    headers = ["family", "model class", "MLP rewritten/found/layers", "routed experts rewritten/found", "LM head",
               "attention masks rewritten/found: terms", "parity", "notes"]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _mlp_cell(r: FamilyResult) -> str:
    return f"{r.mlp_rewritten}/{r.mlp_found}/{r.layers}" if r.status == "ran" else "-"


def _experts_cell(r: FamilyResult) -> str:
    if r.status != "ran" or not (r.moe or r.experts_found):
        return "-"
    return f"{r.experts_rewritten}/{r.experts_found}"


def _masks_cell(r: FamilyResult) -> str:
    if r.status != "ran" or not r.masks_found:
        return "-"
    return f"{r.masks_rewritten}/{r.masks_found}" + (f": {'; '.join(r.mask_forms)}" if r.mask_forms else "")


def _head_cell(r: FamilyResult) -> str:
    return ("yes" if r.lm_head else "no") if r.status == "ran" else "-"


def _parity_cell(r: FamilyResult) -> str:
    if r.status != "ran":
        return "-"
    errors = f"loss {r.loss_error:.1e}, grad {r.grad_error:.1e}"
    if r.parity and r.fp64_errors:
        eager, mst = r.fp64_errors
        return f"ok within fp32 rounding ({errors}; against fp64, eager {eager:.1e}, mst {mst:.1e} relative)"
    if r.parity:
        return f"ok ({errors})"
    return f"{'FAIL' if r.rewritten else 'differs, nothing rewritten'} ({errors}; worst {r.grad_worst})"


def _notes(r: FamilyResult) -> str:
    if r.status != "ran":
        return f"{r.status}: {r.note}"
    notes = []
    if r.moe and not r.experts_found:
        notes.append("mixture-of-experts: no routed-expert site found (no top-k routing per token combined back in one graph)")
    if r.plain_compile_parity is False:
        notes.append("aot_eager without the rewrites differs from eager too")
    if r.graph_breaks and 0 < r.mlp_found < r.layers:
        notes.append(
            "sites count once per compiled graph: with graph breaks inside the layers, Dynamo may run "
            "one layer's graph for every layer"
        )
    elif r.mlp_found < r.layers and not r.moe:
        notes.append(f"{r.layers - r.mlp_found} of {r.layers} MLPs not matched as linear → activation → linear")
    if not r.lm_head and not any(site.startswith("lm_head") for site in r.left_alone):
        notes.append("no linear → cross_entropy matched for the LM head")
    if r.graph_breaks:
        notes.append(f"{r.graphs} graphs; graph breaks: " + "; ".join(_short(b) for b in r.graph_breaks))
    notes += [_short(s, 200) for s in _grouped(r.left_alone)]
    notes += [_short(w, 300) for w in r.warnings]
    return "<br>".join(n.replace("|", "\\|") for n in notes)


def _grouped(left_alone: list[str]) -> list[str]:
    """One line per distinct reason, with how many sites gave it."""
    counts: dict[str, int] = {}
    for line in left_alone:
        kind, _, reason = line.partition(" at ")
        key = f"{kind} left alone: {reason.partition(': ')[2]}"
        counts[key] = counts.get(key, 0) + 1
    return [f"{key} (x{n})" if n > 1 else key for key, n in counts.items()]


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def document(results: list[FamilyResult], command: str, seconds: float) -> str:
    import torch
    import transformers

    return "\n".join([
        "# Coverage across architectures",
        "",
        "Every model type in transformers' causal-LM mapping (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), built",
        "from a tiny config with random weights (`mst_fx/models/tiny_configs.py`: 2 layers, hidden 64, vocab 512,",
        f"no dropout, train mode), one training step on {BATCH}x{TOKENS} tokens eagerly and under",
        f"`torch.compile(model, backend=mst_fx.backend(compiler=\"aot_eager\", chunks={CHUNKS}))`,",
        "each family in its own process. *MLP rewritten/found/layers*: MLP sites rewritten, MLP sites the",
        "pass found (rewritten or left alone; shared experts and multi-token-prediction layers add to",
        "one per layer), layers with an MLP (dense or mixture-of-experts) in the config. *Parity*: the loss within",
        f"rtol {RTOL:g} and every parameter's gradient within rtol {RTOL:g}, atol {ATOL:g} of eager (fp32);",
        "the largest absolute errors are shown. Where that fails, both runs are measured against the same step",
        "in fp64: *within fp32 rounding* when mst's relative error is at most twice eager's own.",
        "*Attention masks*: the N x N masks transformers builds under compile (one per mask type, shared by",
        "the layers taking it), run without the mask, and the terms read from each. A site left alone is",
        "listed with the pass's reason.",
        "",
        f"Regenerate: `{command}` (took {_duration(seconds)} on 2 CPU cores).",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        f"**{summary_line(results)}.**",
        "",
        table(results),
        "",
    ])  # fmt: skip


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", help="comma-separated model types (default: every causal-LM family)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per family")
    p.add_argument(
        "--output",
        help=f"write the markdown here (default: {os.path.relpath(DOC, REPO)} for a full sweep, none for --families)",
    )
    p.add_argument("--json", help="also write every family's raw result here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one family, print JSON
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    from mst_fx.models.tiny_configs import causal_lm_families

    families = args.families.split(",") if args.families else causal_lm_families()
    started = time.perf_counter()
    results = sweep(families, args.timeout, verbose=True)
    seconds = time.perf_counter() - started
    print(summary_line(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    output = args.output or (None if args.families else DOC)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(document(results, _command(args), seconds))
        print(f"wrote {output}")
    else:
        print(table(results))
    return 1 if any(r.parity_failed for r in results) else 0


def _command(args: argparse.Namespace) -> str:
    """The command that regenerates the same table (where it is written to and --json aside)."""
    flags = [f"--families {args.families}"] if args.families else []
    flags += [f"--timeout {args.timeout:g}"] if args.timeout != DEFAULT_TIMEOUT else []
    return " ".join(["python tools/coverage.py", *flags])


if __name__ == "__main__":
    sys.exit(main())
