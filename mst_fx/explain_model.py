"""`mst_fx.explain(model, ...)` and `mst-inspect`: the inspection tools (`mst_fx.inspect`) with
the backend's options, validated here.

    with torch.device("meta"):                                  # shapes only: any size fits
        model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.zeros(1, 32768, dtype=torch.long, device="meta")
    report = mst_fx.explain(model, ids, example_kwargs={"labels": ids, "use_cache": False}, chunks="auto")
    print(report)                    # the table mst-inspect prints; report.to_dict() for JSON

    model = torch.compile(model, backend="mst"); model(...)   # a real run, then:
    report = mst_fx.last_report()

`explain` traces the model with Dynamo, exactly as `torch.compile` does, and runs the passes on every
graph it captures, but compiles nothing: each graph then runs as it is (`mst_fx.inspect.dry_run`). On
a model built on the meta device nothing is allocated, so any size can be inspected. What a report
counts, and its JSON keys: `mst_fx.inspect.model_report`.
"""

from __future__ import annotations

from mst_fx.inspect import cli
from mst_fx.inspect.dry_run import dry_run
from mst_fx.inspect.model_report import ModelReport
from mst_fx.options import MstOptions


def explain(model, *example_inputs, example_kwargs: dict | None = None, target: str | None = None,
            **options) -> ModelReport:  # fmt: skip
    """Trace `model(*example_inputs, **example_kwargs)` with Dynamo and report what mst would do.

    `options` are the backend's (`chunk_size`, `chunks`, `mlp`, `lm_head`, `attention`, `keep_logits`,
    `grad_accumulation`, `memory_budget`; `compiler` is accepted and unused). Runs with gradients enabled, as a
    training step does. Nothing is compiled; each graph runs unrewritten (on meta tensors that costs
    nothing). Raises what the model raises; a bad option raises ValueError before anything runs.
    """
    return dry_run(model, example_inputs, example_kwargs, MstOptions.from_mapping(options), target)


def inspect_main(argv=None) -> int:
    """The `mst-inspect` command (`mst_fx.inspect.cli`)."""
    return cli.main(argv, read_options=MstOptions.from_mapping)
