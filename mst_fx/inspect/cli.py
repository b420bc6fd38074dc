"""`mst-inspect`: what mst finds in a model, what it rewrites, and the peak memory that saves.

    mst-inspect llama --tokens 32768           a built-in family (tiny; llama-3-8b for real sizes)
    mst-inspect mistral                        any other Hugging Face causal-LM family, tiny (mst_fx.models.tiny_configs)
    mst-inspect path/to/config.json            a Hugging Face causal-LM config (or its directory)
    mst-inspect my_pkg.models:build            a factory: build() -> (model, args) or (model, args, kwargs)

The model is built on the meta device and traced with Dynamo: no weights are allocated and nothing
is downloaded, so real sizes run on a laptop. A factory is called inside `with torch.device("meta")`,
so the tensors it creates are shapes only (inputs it makes elsewhere are moved to meta when the
model is there). Family and config models are called as a training step calls them:
`model(input_ids, labels=input_ids, use_cache=False)`.

Exit status: 0 done, 1 the model failed to trace, 2 a bad target or argument.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import report_format
from .dry_run import dry_run


class BadTarget(Exception):
    """The target or an argument can't be used; the message says why, in one line."""


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=32000)  # fmt: skip


def _llama_3_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    )  # fmt: skip


def _tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=1000, bos_token_id=0, eos_token_id=0,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip


def _gpt2_124m_config():
    from transformers import GPT2Config

    return GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2 small's sizes are the defaults


# Built-in targets by name: the tiny ones are the shapes of `mst_fx.models` (the README's benchmarks).
FAMILIES: dict[str, Callable] = {
    "llama": _tiny_llama_config,
    "llama-3-8b": _llama_3_8b_config,
    "gpt2": _tiny_gpt2_config,
    "gpt2-124m": _gpt2_124m_config,
}
DEFAULT_TOKENS = 4096
SIZE_FLAGS = ("hidden", "intermediate", "vocab", "layers")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad argument
        self.exit(2, f"mst-inspect: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="mst-inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help=f"family ({', '.join(FAMILIES)}), config.json (or its folder), or module:function")
    p.add_argument("--tokens", type=_positive, help=f"sequence length (default {DEFAULT_TOKENS})")
    p.add_argument("--batch", type=_positive, help="sequences per batch (default 1)")
    p.add_argument("--hidden", type=_positive, help="override the config's hidden size")
    p.add_argument("--intermediate", type=_positive, help="override the config's MLP width")
    p.add_argument("--vocab", type=_positive, help="override the config's vocabulary size")
    p.add_argument("--layers", type=_positive, help="override the config's number of layers")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype for family and config targets (default float32)",
    )
    p.add_argument(
        "--attention-mask",
        action="store_true",
        help="pass an all-ones attention_mask, as HF Trainer's collators do (transformers then builds an N x N mask)",
    )
    p.add_argument("--options", default="{}", help="backend options as JSON, e.g. '{\"chunks\": 8}'")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="the report as JSON (keys: see mst_fx.inspect.model_report)")
    output.add_argument("--graph", choices=["before", "after"], help="print the graphs' code before/after the rewrite")
    return p.parse_args(argv)


def main(argv=None, *, read_options: Callable[[dict], Any]) -> int:
    """`read_options`: the backend's options from a mapping, raising ValueError for a bad one
    (`mst_fx.MstOptions.from_mapping`; `mst_fx.explain_model.inspect_main` passes it)."""
    args = parse_args(argv)
    try:
        options = _parse_options(args.options, read_options)
        model, call_args, call_kwargs, description = load_target(args)
        _quiet_torch_errors()
        report = dry_run(model, call_args, call_kwargs, options, description)
    except BadTarget as why:
        print(f"mst-inspect: error: {why}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 (the model failed to build or trace: say so in one line)
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"mst-inspect: {args.target} failed: {type(error).__name__}: {first_line}", file=sys.stderr)
        return 1
    if args.json:
        _emit(report_format.to_json(report))
    elif args.graph:
        _emit(report_format.graph_code(report, args.graph))
    else:
        _emit(report_format.to_table(report))
    return 0


def _quiet_torch_errors() -> None:
    """A model that fails to trace is reported in one line (exit 1); without this, the fake-tensor
    machinery also logs the failure's whole traceback. TORCH_LOGS, when set, is left to decide."""
    if "TORCH_LOGS" not in os.environ:
        logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)


def _emit(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `mst-inspect ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exiting does not fail again


def _parse_options(text: str, read_options: Callable[[dict], Any]):
    try:
        options = json.loads(text)
    except json.JSONDecodeError as why:
        raise BadTarget(f"--options is not JSON ({why})") from None
    if not isinstance(options, dict):
        raise BadTarget(f"--options must be a JSON object, got {text!r}")
    try:
        return read_options(options)
    except ValueError as why:
        raise BadTarget(str(why)) from None


def load_target(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple, dict, str]:
    """(model on meta, positional inputs, keyword inputs, a description of what it is)."""
    target = args.target
    if target in FAMILIES:
        return _causal_lm(FAMILIES[target](), args, f"{target} (built-in)")
    if os.path.exists(target):
        return _causal_lm(_config_from_file(Path(target)), args, target)
    if ":" in target:
        return _from_factory(target, args)
    tiny = _tiny_family_config(target)
    if tiny is not None:
        return _causal_lm(tiny, args, f"{target} (tiny, mst_fx.models.tiny_configs)")
    raise BadTarget(
        f"unknown target {target!r}: not a family ({', '.join(FAMILIES)} or a Hugging Face model type such "
        f"as mistral), not an existing config.json or folder, not module:function"
    )


def _tiny_family_config(model_type: str):
    """Any other Hugging Face causal-LM family, tiny (`mst_fx.models.tiny_configs`); None if there is none."""
    try:
        from mst_fx.models import tiny_configs
    except ImportError:  # an install without the tiny-config builder: built-in families only
        return None
    if model_type not in tiny_configs.causal_lm_families():
        return None
    reason = tiny_configs.why_not_built(model_type)
    if reason is not None:
        raise BadTarget(f"{model_type} can't be inspected: {reason}")
    return tiny_configs.tiny_config(model_type)


def _config_from_file(path: Path):
    from transformers import AutoConfig

    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise BadTarget(f"no config.json in {str(path)!r}")
    try:
        return AutoConfig.from_pretrained(str(config_file))
    except (OSError, ValueError, KeyError) as why:
        first_line = (str(why).strip().splitlines() or [""])[0]
        raise BadTarget(f"{str(config_file)!r} is not a Hugging Face model config: {first_line}") from None


def _causal_lm(config, args, name: str):
    """The config's causal LM on meta, in training mode, with an input batch of meta token ids."""
    from transformers import AutoModelForCausalLM

    _refuse_non_causal(config, name)
    tokens, batch = args.tokens or DEFAULT_TOKENS, args.batch or 1
    _resize(config, args, tokens)
    try:
        with torch.device("meta"):
            model = _from_config(AutoModelForCausalLM, config)
    except ValueError as why:  # no causal-LM class for this config
        raise BadTarget(f"{name}: {(str(why).strip().splitlines() or [''])[0]}") from None
    model = model.to(getattr(torch, args.dtype)).train()
    ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
    sizes = ", ".join(f"{label} {getattr(config, field, '?')}" for label, field in _SIZE_FIELDS)
    description = f"{name}: {type(model).__name__}, {sizes}, {batch} x {tokens} tokens, {args.dtype}"
    kwargs = {"labels": ids, "use_cache": False}
    if args.attention_mask:
        kwargs["attention_mask"] = torch.ones_like(ids)
        description += ", all-ones attention_mask"
    return model, (ids,), kwargs, description


_SIZE_FIELDS = (("hidden", "hidden_size"), ("vocab", "vocab_size"), ("layers", "num_hidden_layers"))


def _from_config(auto_class, config):
    """SDPA attention, or eager where the family has no SDPA path (on meta the two cost the same)."""
    try:
        return auto_class.from_config(config, attn_implementation="sdpa")
    except ValueError as why:
        if "attention" not in str(why).lower():
            raise
        return auto_class.from_config(config, attn_implementation="eager")


def _refuse_non_causal(config, name: str) -> None:
    """A config written for another kind of model (BERT's `BertForMaskedLM`): transformers would
    still build a causal-LM head on it, and the report would describe a model nobody trains."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures and not causal.intersection(architectures):
        raise BadTarget(
            f"{name} is a {', '.join(architectures)} ({config.model_type}), not a causal language model; "
            "mst-inspect inspects causal LMs (a factory target can build anything else)"
        )


def _resize(config, args, tokens: int) -> None:
    """Apply --hidden/--intermediate/--vocab/--layers, and room for `tokens` positions."""
    heads = getattr(config, "num_attention_heads", None)
    if args.hidden and heads and args.hidden % heads:
        raise BadTarget(f"--hidden {args.hidden} is not a multiple of the model's {heads} attention heads")
    rotary = any("rope" in name for name in config.to_dict())
    if args.hidden and heads and rotary and (args.hidden // heads) % 2:
        raise BadTarget(f"--hidden {args.hidden} gives {heads} heads of odd width {args.hidden // heads}; rotary "
                        "embeddings need an even one")  # fmt: skip
    if args.hidden:
        config.hidden_size = args.hidden
        if getattr(config, "head_dim", None):
            config.head_dim = args.hidden // config.num_attention_heads
    if args.intermediate:
        setattr(config, "intermediate_size" if hasattr(config, "intermediate_size") else "n_inner", args.intermediate)
    if args.vocab:
        config.vocab_size = args.vocab
    if args.layers:
        config.num_hidden_layers = args.layers
    if getattr(config, "max_position_embeddings", None) is not None:
        config.max_position_embeddings = max(config.max_position_embeddings, tokens)


def _from_factory(target: str, args):
    given = [f"--{flag}" for flag in (*SIZE_FLAGS, "tokens", "batch") if getattr(args, flag)]
    if given:
        raise BadTarget(f"{', '.join(given)} apply to family and config targets; a factory chooses its own sizes")
    module_name, _, function_name = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: factories in the current folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as why:
        raise BadTarget(f"cannot import {module_name!r} for target {target!r}: {why}") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise BadTarget(f"{module_name!r} has no function {function_name!r}")
    with torch.device("meta"):
        built = factory()
    if not (isinstance(built, tuple) and len(built) in (2, 3) and isinstance(built[0], torch.nn.Module)):
        raise BadTarget(f"{target} must return (model, args) or (model, args, kwargs), got {type(built).__name__}")
    model, call_args, *rest = built
    call_kwargs = rest[0] if rest else {}
    if not isinstance(call_args, (tuple, list)) or not isinstance(call_kwargs, dict):
        raise BadTarget(f"{target} must return (model, args) or (model, args, kwargs) with a tuple and a dict")
    return model, tuple(call_args), call_kwargs, target
