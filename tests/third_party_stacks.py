"""Tiny models and training steps of three third-party training stacks, built the way their own
trainers build and run them (random weights, nothing downloaded), for tools/stack_bench.py and
for tests. Needs the stacks installed (tools/stacks_install.sh); they are imported only inside the
builders, so importing this module needs none of them.

    stack = build_torchtitan(4096)                  # or build_litgpt(4096), build_x_transformers(4096)
    model, loss_fn = stack.compile_model_fn(stack.model, "mst")   # the trainer's compile calls
    loss = training_step(model, stack.inputs, stack.labels, loss_fn)

torchtitan 0.3.0 (torchtitan/trainer.py `Trainer.__init__`, `_forward_backward_body`):
  the model is built on the meta device, `parallelize_llama` -> `apply_compile`
  (torchtitan/distributed/compile.py) compiles each TransformerBlock in place
  (`block.compile(backend=compile.backend, fullgraph=True)`), then `to_empty` + `init_weights`.
  Embedding, final norm and head run outside the compiled blocks. The loss is
  `CrossEntropyLoss` (torchtitan/components/loss.py): `BaseLoss._maybe_compile` wraps its
  `cross_entropy_loss(pred, labels, *, global_vocab_size)` in
  `torch.compile(fn, backend=compile.backend)`, the model's backend; that fn is
  `F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum",
  ignore_index=-100)`, and `__call__` divides the sum by global_valid_tokens (labels != -100,
  counted by `train_step`) outside it. `loss="chunked"` gives `ChunkedLossWrapper` instead (what
  the registered llama3 configs, llama3_debugmodel and llama3_8b..405b, use; plain CE is
  `llama3_debugmodel_ce_loss`): the model skips its head (`_skip_lm_head`), and the wrapper runs
  head + compiled CE and their backward per sequence chunk (8) inside the loss call.
  FlexAttention has no CPU backward: each block's inner attention is swapped for
  `ScaledDotProductAttention` (causal), as `build_decoder_config_for_backend` in
  torchtitan/experiments/graph_trainer/common_utils.py does for its tests.
litgpt 0.5.13 (litgpt/pretrain.py `main`, `fit`): `GPT(config)` under `fabric.init_module`,
  `initialize_weights`, `model.max_seq_length = ...`, `model = torch.compile(model)`,
  `model = fabric.setup(model)`; per step `input_ids = data[:, :T]`, `targets = data[:, 1:T+1]`,
  `logits = model(input_ids)`, `loss = chunked_cross_entropy(logits, targets)` (litgpt/utils.py,
  chunk_size 128, outside the compiled model), `fabric.backward(loss)`.
x-transformers 2.31.10 (README.md "Decoder-only (GPT-like)", train_enwik8.py): `TransformerWrapper(
  num_tokens, max_seq_len, attn_layers=Decoder(dim, depth, heads, rotary_pos_emb=True))` in
  `AutoregressiveWrapper` (x_transformers/autoregressive_wrapper.py); per step
  `loss = model(seq)` on `seq_len + 1` ids (`TextSamplerDataset.__getitem__`), `loss.backward()`.
  The wrapper is the step: `AutoregressiveWrapper.forward` feeds all of seq to the net
  (`TransformerWrapper.forward`, x_transformers/x_transformers.py: token embedding, the Decoder's
  blocks, final norm, `to_logits`), drops the last position's logits, and takes the loss of the
  rest against `seq[:, 1:]` with torch_einops_utils' `cross_entropy` (stable_softmax.py
  `cross_entropy` -> `_cross_entropy`: one-hot mask `arange == target`, gather of the target logit,
  logsumexp of a where over the others, softplus; a where on labels != -100, sum / count), not
  F.cross_entropy. train_enwik8.py runs it eagerly; compiling it is `torch.compile(model)` on the
  wrapper, so one graph holds the model, its head and that loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

IGNORE_INDEX = -100  # every stack's ignore index


class Stack(NamedTuple):
    model: torch.nn.Module  # the stack's own model, uncompiled; its parameters are the ones trained
    inputs: dict[str, torch.Tensor]  # model forward kwargs, as the trainer passes them
    labels: torch.Tensor
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]  # (model output, labels) -> loss, uncompiled
    # (model, backend or None for no compile) -> (module to call, loss_fn): the trainer's compile calls
    compile_model_fn: Callable[..., tuple[torch.nn.Module, Callable]]


def training_step(step_model, inputs: dict, labels: torch.Tensor, loss_fn) -> torch.Tensor:
    """One forward + backward as both trainers run it; returns the (detached) loss."""
    loss = loss_fn(step_model(**inputs), labels)
    loss.backward()  # fabric.backward on one CPU device at 32-true is loss.backward()
    return loss.detach()


def llama3_ffn_hidden(dim: int) -> int:
    """torchtitan's `compute_ffn_hidden_dim(dim, multiple_of=256)`: 768 for dim 256. litgpt's
    Llama configs give `intermediate_size` explicitly, so both stacks use this one."""
    return 256 * -(-int(8 * dim / 3) // 256)


def _random_sequence(tokens: int, vocab: int, seed: int) -> torch.Tensor:
    """tokens + 1 ids: both trainers take inputs = seq[:-1], labels = seq[1:] (one document)."""
    return torch.randint(0, vocab, (1, tokens + 1), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- torchtitan 0.3.0


def _torchtitan_config(tokens: int, dim: int, layers: int, heads: int, kv_heads: int, vocab: int):
    """A Llama3Model.Config as torchtitan/models/llama3/__init__.py writes its flavours, with
    SDPA attention swapped in."""
    import torchtitan.models.llama3 as l3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    rope = ComplexRoPE.Config(dim=dim // heads, max_seq_len=tokens, theta=500000, scaling="llama")
    blocks = l3._build_llama3_layers(
        n_layers=layers, dim=dim, n_heads=heads, n_kv_heads=kv_heads, hidden_dim=llama3_ffn_hidden(dim),
        rope=rope, attn_backend="flex",
    )  # fmt: skip
    for block in blocks:
        block.attention.inner_attention = ScaledDotProductAttention.Config()
    return l3.Llama3Model.Config(
        dim=dim, vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=l3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=l3._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=l3._output_linear_init(dim)),
        layers=blocks,
    )  # fmt: skip


def _torchtitan_loss(vocab: int, loss: str, backend: str | None, lm_head):
    """The trainer's `config.loss.build(compile_config=config.compile)`; None: compile off."""
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.config import CompileConfig

    compile_config = CompileConfig(enable=True, backend=backend) if backend else None
    ce = CrossEntropyLoss.Config(global_vocab_size=vocab)
    if loss == "ce":
        return ce.build(compile_config=compile_config)
    wrapper = ChunkedLossWrapper.Config(loss_fn=ce).build(compile_config=compile_config)
    wrapper.set_lm_head(lm_head)  # as Trainer.__init__ does for ChunkedLossWrapper
    return wrapper


def build_torchtitan(
    tokens: int, hidden: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2,
    vocab: int = 32000, seed: int = 0, loss: str = "ce",
) -> Stack:  # fmt: skip
    """torchtitan's Llama3Model and loss; `loss` is "ce" (CrossEntropyLoss) or "chunked"
    (ChunkedLossWrapper, the registered llama3 configs' default)."""
    if loss not in ("ce", "chunked"):
        raise ValueError(f"loss must be 'ce' or 'chunked', not {loss!r}")
    model = _torchtitan_model(_torchtitan_config(tokens, hidden, layers, heads, kv_heads, vocab), seed)
    model._skip_lm_head = loss == "chunked"  # as Trainer.__init__ sets it for ChunkedLossWrapper

    return _torchtitan_stack(model, tokens, vocab, loss, seed)


def _torchtitan_stack(model, tokens: int, vocab: int, loss: str, seed: int) -> Stack:
    """The Stack of a torchtitan model: one document of random tokens, the trainer's loss, and its
    compile calls (`apply_compile` per TransformerBlock, MoE blocks included, and the loss's)."""

    def compile_model_fn(model, backend: str | None, loss_backend: str | None = "same"):
        """apply_compile and the loss's compile, or neither (backend None: the trainer's compile off).
        loss_backend: "same" (the trainer's: the model's backend), another backend, or None (eager)."""
        from torchtitan.config import CompileConfig
        from torchtitan.distributed import ParallelDims
        from torchtitan.distributed.compile import apply_compile

        if backend:
            one_device = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
            apply_compile(model, compile_config=CompileConfig(enable=True, backend=backend), parallel_dims=one_device)
        loss_compile = (backend if loss_backend == "same" else loss_backend) if backend else None
        head_loss = _torchtitan_loss(vocab, loss, loss_compile, model.lm_head)
        return model, _with_valid_tokens(head_loss)

    seq = _random_sequence(tokens, vocab, seed)
    inputs = {"tokens": seq[:, :-1], "positions": torch.arange(tokens).unsqueeze(0)}  # one document
    eager_loss = _with_valid_tokens(_torchtitan_loss(vocab, loss, None, model.lm_head))
    return Stack(model, inputs, seq[:, 1:], eager_loss, compile_model_fn)


def _torchtitan_model(config, seed: int):
    """Trainer.__init__: build on the meta device, `to_empty`, `init_weights` (seeded, so that every
    variant gets the same weights), `train()`. The trainer runs apply_compile between build and
    to_empty; compile_model_fn runs it after: `block.compile()` only marks the block, in place, so
    the order changes nothing."""
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model.train()


def _with_valid_tokens(head_loss):
    """`loss, _ = loss_fn(pred, labels, global_valid_tokens)` as `_forward_backward_body` calls it,
    with global_valid_tokens = (labels != IGNORE_INDEX).sum() as `train_step` counts it."""

    def loss_fn(pred, labels):
        return head_loss(pred, labels, (labels != IGNORE_INDEX).sum())[0]

    return loss_fn


# ---------------------------------------------------------------- litgpt 0.5.13


def build_litgpt(
    tokens: int, hidden: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2,
    vocab: int = 32000, seed: int = 0,
) -> Stack:  # fmt: skip
    """litgpt's GPT with a Llama-3 config, built as litgpt/pretrain.py `main` builds it."""
    import lightning as L
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.pretrain import initialize_weights
    from litgpt.utils import chunked_cross_entropy

    config = Config(
        name="tiny-llama3", block_size=tokens, vocab_size=vocab, padded_vocab_size=vocab, n_layer=layers,
        n_head=heads, n_embd=hidden, n_query_groups=kv_heads, rotary_percentage=1.0, parallel_residual=False,
        bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
        intermediate_size=llama3_ffn_hidden(hidden), rope_base=500000,
    )  # fmt: skip
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    torch.manual_seed(seed)  # pretrain.main: fabric.seed_everything(seed), without its log line
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
    model.max_seq_length = tokens

    def compile_model_fn(model, backend: str | None):
        """pretrain.main: `model = torch.compile(model)`, then `fabric.setup(model)`."""
        step_model = torch.compile(model, backend=backend) if backend else model
        return fabric.setup(step_model), chunked_cross_entropy

    seq = _random_sequence(tokens, vocab, seed)  # fit: input_ids = data[:, :T], targets = data[:, 1:T+1]
    input_ids, targets = seq[:, :tokens].contiguous().long(), seq[:, 1 : tokens + 1].contiguous().long()
    return Stack(model, {"idx": input_ids}, targets, chunked_cross_entropy, compile_model_fn)


# ---------------------------------------------------------------- x-transformers 2.31.10


def build_x_transformers(
    tokens: int, dim: int = 256, layers: int = 2, heads: int = 4, vocab: int = 32000, seed: int = 0,
    **decoder_options,
) -> Stack:  # fmt: skip
    """x-transformers' decoder-only TransformerWrapper in its AutoregressiveWrapper, as its README
    and train_enwik8.py build it. Decoder options: rotary_pos_emb=True (train_enwik8.py's; it also
    drops the absolute position embedding, whose max_seq_len the wrapper's tokens + 1 ids would
    exceed) and ff_glu=True (the README's gated feed-forward: GELU-GLU, one fused
    Linear(dim, 2 * 4 * dim) then Linear(4 * dim, dim), ff_mult 4); the rest stay x-transformers'
    defaults (LayerNorm, biased FF, dim_head 64, its own attention rather than SDPA), and
    decoder_options add to or replace them. The model is the wrapper: its parameters are
    `net.*`, the head `net.to_logits`."""
    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.autoregressive_wrapper import AutoregressiveWrapper

    options = {"rotary_pos_emb": True, "ff_glu": True, **decoder_options}
    torch.manual_seed(seed)  # the constructors init from the global RNG (TokenEmbedding.init_, nn.Linear's)
    decoder = Decoder(dim=dim, depth=layers, heads=heads, **options)
    wrapper = AutoregressiveWrapper(TransformerWrapper(num_tokens=vocab, max_seq_len=tokens, attn_layers=decoder))

    def compile_model_fn(model, backend: str | None):
        """`torch.compile(model)` on the whole wrapper: the loss is computed inside the graph."""
        return (torch.compile(model, backend=backend) if backend else model), _wrapper_loss

    seq = _random_sequence(tokens, vocab, seed)  # TextSamplerDataset: seq_len + 1 ids, split by the wrapper
    return Stack(wrapper.train(), {"x": seq}, seq[:, 1:], _wrapper_loss, compile_model_fn)


def _wrapper_loss(loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AutoregressiveWrapper returns the loss itself, its targets (`x[:, 1:]`, what Stack.labels
    holds) taken from the input: nothing is left to compute outside it."""
    return loss


BUILDERS = {"torchtitan": build_torchtitan, "litgpt": build_litgpt, "x-transformers": build_x_transformers}


# ---------------------------------------------------------------- torchtitan 0.3.0, Qwen3-MoE


def build_torchtitan_moe(
    tokens: int, vocab: int = 2000, dtype: torch.dtype = torch.float32, *, seed: int = 0, loss: str = "ce",
    **sizes: int,
) -> Stack:  # fmt: skip
    """torchtitan's Qwen3Model with MoE blocks (the "debugmodel_moe" / "30B-A3B" flavours' layout)
    at tiny widths, run as Trainer.__init__ / `_forward_backward_body` run it, like build_torchtitan.

    sizes (defaults): dim 64, layers 2, heads 4, kv_heads 2, head_dim 16, experts 8, top_k 2,
    moe_hidden 32. Every block is an MoE block, as in all registered Qwen3-MoE flavours. dim and
    moe_hidden must be multiples of 8: torch._grouped_mm needs 16-byte strides in bf16.
    dtype: the parameters' dtype (float32, or bfloat16 standing in for FSDP2's
    `param_dtype=mixed_precision_param`, which parallelize_qwen3 -> apply_fsdp_to_decoder sets;
    buffers stay float32 as FSDP leaves them). `loss` as in build_torchtitan ("ce" or "chunked";
    the registered qwen3 trainer configs, qwen3_moe_debug and qwen3_30b_a3b, use "chunked").

    Mirrors (torchtitan 0.3.0):
      torchtitan/models/qwen3/__init__.py `_build_qwen3_moe_layers`, `_debugmodel_moe`, `_30b_a3b`
        (Qwen3TransformerBlock with qk_norm, CosSinRoPE; router softmax + route_norm; inits
        `_LINEAR_INIT`, `_residual_output_init`, `_moe_experts_init`; comm_backend "standard");
      torchtitan/models/common/config_utils.py `make_moe_config` (load_balance_coeff 1e-3),
        `make_router_config`, `make_routed_experts_config` (GroupedExperts + AllToAllTokenDispatcher,
        which with EP=1 (ep_mesh None) falls back to `LocalTokenDispatcher.dispatch/combine`);
      torchtitan/models/common/moe.py `MoE.forward`: `TokenChoiceTopKRouter` (gate under
        autocast(float32), softmax, topk(sorted=False) on scores + expert_bias_E, gather, normalise),
        routing-map scatter_ -> tokens per expert, `tokens_per_expert_E.add_` (no_grad, training);
        `RoutedExperts`: argsort(stable) dispatch, `GroupedExperts.forward` = three
        `torch._grouped_mm(x.bfloat16(), w.bfloat16().transpose(-2, -1), offs=cumsum(counts))`
        (always bf16, output `.type_as(x)`; the default and only experts path in 0.3.0: there is no
        for-loop fallback / use_grouped_mm flag / padding in the EP=1 path; it runs on CPU in
        torch 2.13), combine = fp32 score multiply + `torchtitan::deterministic_scatter_add`
        (torchtitan/ops/scatter_add.py custom op);
      torchtitan/models/qwen3/parallelize.py `parallelize_qwen3` -> distributed/compile.py
        `apply_compile`: sets `torch._dynamo.config.capture_scalar_outputs = True` and
        `skip_fwd_side_effects_in_bwd_under_checkpoint = True`, then
        `block.compile(backend=..., fullgraph=True)` per whole TransformerBlock (MoE included).
    No auxiliary loss: torchtitan balances experts aux-loss-free; `register_moe_load_balancing_hook`
    (components/optimizer/optimizer.py, the flavour's post_optimizer_build_fn) updates expert_bias_E
    from tokens_per_expert_E in an optimizer step pre-hook, outside the model and the loss (no
    optimizer here, so expert_bias_E stays 0 and tokens_per_expert_E accumulates across steps).
    Attention: SDPA swapped in for FlexAttention as in build_torchtitan."""
    import torchtitan.models.qwen3 as q3
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention

    if loss not in ("ce", "chunked"):
        raise ValueError(f"loss must be 'ce' or 'chunked', not {loss!r}")
    s = {"dim": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "experts": 8, "top_k": 2, "moe_hidden": 32}
    unknown = set(sizes) - set(s)
    if unknown:
        raise TypeError(f"unknown sizes {sorted(unknown)}; known: {sorted(s)}")
    s.update(sizes)
    dim = s["dim"]
    blocks = q3._build_qwen3_moe_layers(
        fuse_qkv=True, n_layers=s["layers"], dim=dim, n_heads=s["heads"], n_kv_heads=s["kv_heads"],
        head_dim=s["head_dim"], moe_hidden_dim=s["moe_hidden"], num_experts=s["experts"], top_k=s["top_k"],
        attn_backend="flex", moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=s["head_dim"], max_seq_len=tokens, theta=1000000.0),
    )  # fmt: skip
    for block in blocks:
        block.attention.inner_attention = ScaledDotProductAttention.Config()
    config = q3.Qwen3Model.Config(
        vocab_size=vocab, dim=dim, norm=q3._qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=q3._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=q3._LINEAR_INIT),
        layers=blocks,
    )  # fmt: skip
    model = _torchtitan_model(config, seed)
    if dtype != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(dtype)
    model._skip_lm_head = loss == "chunked"  # as Trainer.__init__ sets it for ChunkedLossWrapper

    return _torchtitan_stack(model, tokens, vocab, loss, seed)
