"""Which attention kernel trains on the packed rows (`model.attn_implementation`), and the varlen kernels for it.

What each value does with packed rows, where it runs and what `auto` picks: docs/training.md#attention-for-packed-rows.
Packed rows whose collator sends no `cu_seq_lens` (TRL 1.15 of the unsloth set) get their document boundaries from
the `position_ids` that restart at each document (`boundaries_from_position_ids`), so no kernel sees a packed row as
one document; `check_collated_documents` stops a run whose collator sends neither.
"""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click
import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("auto", "flash_attention_4", "varlen", "flex_attention", "sdpa")
VARLEN = "varlen"  # the name under which `register_varlen` adds its kernels to transformers (no "flash", "sdpa"
# or "flex" in it: transformers treats names containing those as its own implementations)
HALF_DTYPES = (torch.bfloat16, torch.float16)  # what the flash kernels compute in
FLASH_ATTENTION_4_REMEDY = "install it on a Hopper or newer GPU with `make flash-attention-4`"

# varlen_attn's signature: (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size, enable_gqa)
VarlenKernel = Callable[..., torch.Tensor]
CAUSAL = (-1, 0)  # varlen_attn's window_size for causal attention; it compares tuples (a list would not be causal)


def flash_attention_4_problem() -> str | None:
    """Why the flash-attn-4 wheel cannot run here; None when it can."""
    try:
        version("flash-attn-4")
    except PackageNotFoundError:
        return f"flash-attn-4 is not installed ({FLASH_ATTENTION_4_REMEDY})"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:  # transformers' own minimum for it (FLASH_ATTENTION_COMPATIBILITY_MATRIX)
        return f"flash-attn-4 needs a Hopper or newer GPU (compute capability 9.0+), this one has {major}.{minor}"
    try:
        import flash_attn.cute  # noqa: F401  (what transformers imports for it)
    except Exception as error:  # noqa: BLE001  (a JIT wheel can fail to import for many reasons: report which)
        return f"flash-attn-4 fails to import ({type(error).__name__}: {error})"
    return None


def varlen_problem() -> str | None:
    """Why torch's varlen kernel cannot run here; None when it can."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.varlen"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"torch's flash kernel needs compute capability 8.0+ (Ampere), this GPU has {major}.{minor}"
    return None


def flex_problem() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "flex_attention compiles its kernels with triton, which is not installed"
    return None


MASK_FREE = {"flash_attention_4": flash_attention_4_problem, "varlen": varlen_problem, "flex_attention": flex_problem}
"""The implementations that skip other documents without a dense mask, fastest first, and what rules each out."""


def gpu_problem(implementation: str, dtype: torch.dtype) -> str | None:
    """Why `implementation` (one of MASK_FREE) cannot train weights of `dtype` on this CUDA GPU; None if it can."""
    problem = MASK_FREE[implementation]()
    if problem is None and implementation != "flex_attention" and dtype not in HALF_DTYPES:
        problem = f"its kernel computes in bf16 or fp16, and train.precision gives {dtype}"
    return problem


def resolve(requested: str, dtype: torch.dtype) -> str:
    """The attention implementation that trains for `model.attn_implementation` = `requested` and weights of `dtype`.

    `auto` on a CUDA GPU takes the first of flash_attention_4, varlen and flex_attention that can run, each of which
    keeps the packed documents apart without a dense mask; on a CPU it is varlen, one SDPA call per document. An
    explicit choice that cannot run here stops the stage with the reason.
    """
    if requested == "sdpa":
        return "sdpa"
    if not torch.cuda.is_available():
        if requested == "auto":
            click.echo(
                "train: model.attn_implementation auto uses varlen: no CUDA GPU, so one SDPA call per document "
                "of a packed row on the CPU (no mask built)"
            )
        elif requested != VARLEN:
            raise click.ClickException(
                f"model.attn_implementation: {requested} needs a CUDA GPU and none is visible (torch 2.13 refuses "
                "flex_attention's backward pass on CPU); set it to auto, varlen or sdpa in params.yaml"
            )
        return VARLEN
    if requested != "auto":
        problem = gpu_problem(requested, dtype)
        if problem is not None:
            raise click.ClickException(f"model.attn_implementation: {requested}, but {problem}; or set it to auto")
        return requested
    reasons = []
    for name in MASK_FREE:
        problem = gpu_problem(name, dtype)
        if problem is None:
            because = f" ({'; '.join(reasons)})" if reasons else ""
            click.echo(f"train: model.attn_implementation auto uses {name}{because}")
            return name
        reasons.append(f"not {name}: {problem}")
    click.echo(f"train: model.attn_implementation auto uses sdpa, a dense mask per micro-batch ({'; '.join(reasons)})")
    return "sdpa"


def per_document_attention(
    query: torch.Tensor,  # (tokens, heads, head_dim), documents one after another
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
    window_size: tuple[int, int],
    enable_gqa: bool = False,
) -> torch.Tensor:
    """torch's `varlen_attn` for a CPU: each document attends to itself alone, with one SDPA call per document.

    A call without a mask takes torch's CPU flash kernel, in the dtype given, for all heads at once (GQA included), so
    a packed row costs the sum of its documents' squared lengths, not its own. The documents are views of the packed
    tensors (split's backward concatenates their gradients once). `max_q` and `max_k` are in the signature only: each
    call knows its document's length.
    """
    if not torch.equal(cu_seq_q, cu_seq_k):
        raise ValueError("per-document attention needs the same document boundaries for queries and keys")
    if window_size != CAUSAL:
        raise ValueError(f"per-document attention is causal, with no window; window_size {window_size}")
    lengths = cu_seq_q.diff().tolist()
    documents = zip(query.split(lengths), key.split(lengths), value.split(lengths), strict=True)
    outputs = [
        F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=enable_gqa,
        )[0]
        for q, k, v in documents
    ]
    return torch.cat([output.transpose(0, 1) for output in outputs])  # (tokens, heads, head_dim) again


def boundaries_from_position_ids(position_ids: torch.Tensor, batch: int, tokens: int) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens, longest document) of `batch` rows of `tokens` tokens, from their position ids.

    A document begins at every row's first token and wherever a position id is not the one before plus one: the rule
    by which transformers' masking code finds packed documents for sdpa's block-diagonal mask and flex_attention's
    BlockMask (`find_packed_sequence_indices`), so every kernel sees the same documents. `position_ids` is (batch,
    tokens) or (1, tokens), as transformers makes it for a batch given without.
    """
    positions = position_ids.expand(batch, tokens)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    begin = starts.reshape(-1).nonzero().flatten()
    cu_seq_lens = torch.cat([begin, begin.new_tensor([batch * tokens])]).to(torch.int32)
    return cu_seq_lens, int(cu_seq_lens.diff().max())


_last_boundaries: tuple[weakref.ref, int, int, tuple[torch.Tensor, int]] | None = None


def layer_shared_boundaries(position_ids: torch.Tensor, batch: int, tokens: int) -> tuple[torch.Tensor, int]:
    """`boundaries_from_position_ids`, computed once per forward pass: every decoder layer is handed the same
    `position_ids` tensor, and on a GPU each computation waits for the device twice (nonzero, max)."""
    global _last_boundaries
    if _last_boundaries is not None:
        reference, cached_batch, cached_tokens, boundaries = _last_boundaries
        if reference() is position_ids and (cached_batch, cached_tokens) == (batch, tokens):
            return boundaries
    boundaries = boundaries_from_position_ids(position_ids, batch, tokens)
    _last_boundaries = (weakref.ref(position_ids), batch, tokens, boundaries)
    return boundaries


def collated_document_lengths(batch: dict[str, Any]) -> list[int] | None:
    """The lengths of the documents a padding-free micro-batch hands the model, one after another over its rows; None
    when it says nothing about them (neither `cu_seq_lens_q` nor `position_ids`)."""
    if batch.get("cu_seq_lens_q") is not None:
        return torch.as_tensor(batch["cu_seq_lens_q"]).diff().tolist()
    if batch.get("position_ids") is None:
        return None
    position_ids = torch.as_tensor(batch["position_ids"])
    cu_seq_lens, _ = boundaries_from_position_ids(position_ids, *position_ids.shape)
    return cu_seq_lens.diff().tolist()


def check_collated_documents(collator: Callable[[list[dict]], dict], rows: list[dict[str, Any]], backend: str) -> None:
    """Stop before training unless `collator` hands the model the boundaries of the documents packed in `rows` (their
    `seq_lengths`, as pack wrote them): without them the documents of a row would attend to each other, silently."""
    expected = [length for row in rows for length in row["seq_lengths"]]
    found = collated_document_lengths(collator(rows))
    if found is None:
        raise click.ClickException(
            f"train: the {backend} backend's collator sends neither cu_seq_lens_q/k nor position_ids, so the "
            "documents packed in a row would attend to each other; train with padding-free batches (TRL's "
            "DataCollatorForLanguageModeling with padding_free=True)"
        )
    if found != expected:
        raise click.ClickException(
            f"train: the {backend} backend's collator marks documents of lengths {found[:8]} in the first packed "
            f"rows, where pack wrote {expected[:8]}: the documents would attend to each other"
        )


def kernel_for(query: torch.Tensor, module: torch.nn.Module) -> tuple[VarlenKernel, torch.dtype]:
    """The varlen kernel for the device the attention runs on, and the dtype it computes in."""
    if query.device.type != "cuda":
        return per_document_attention, query.dtype  # torch's CPU flash path computes in float32 as well as bf16
    from torch.nn.attention.varlen import varlen_attn

    # The flash kernel computes in bf16 or fp16; peft can hand float32 activations over.
    return varlen_attn, query.dtype if query.dtype in HALF_DTYPES else module.config.dtype


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (batch, heads, tokens, head_dim), as every transformers attention function gets it
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for `varlen`: the packed documents, each attending to itself, through the
    kernel of `kernel_for`.

    The documents' boundaries are the `cu_seq_lens_q/k` that TRL 1.16's padding-free collator sends; without them
    (TRL 1.15's collator, plain batches) they are read from the `position_ids` every decoder layer hands over: a plain
    row counts up from its first token and is one document.
    """
    if attention_mask is not None:
        # flash_attention_mask hands over a 2-D mask only when a row holds padding: the varlen kernels have no use
        # for it, and packed rows never carry one.
        raise ValueError("varlen attention takes unpadded or padding-free batches; this one has padding")
    if sliding_window is not None or dropout:
        raise ValueError("varlen attention supports neither sliding windows nor attention dropout")
    batch, _, tokens, head_dim = query.shape
    if cu_seq_lens_q is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # a row could hold several documents, and nothing would say where they begin
            raise ValueError(
                "varlen attention needs the documents' boundaries: cu_seq_lens_q/k (TRL's padding-free collator) or "
                "position_ids that restart at every document; the model passed neither"
            )
        cu_seq_lens_q, max_length_q = layer_shared_boundaries(position_ids, batch, tokens)
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    kernel, dtype = kernel_for(query, module)
    # (tokens, heads, head_dim): the layout transformers' projections already have in memory, so on a CPU these are
    # views (a copy only where the CUDA kernel needs a cast)
    query, key, value = (
        t.transpose(1, 2).reshape(batch * tokens, t.shape[1], head_dim).to(dtype) for t in (query, key, value)
    )
    output = kernel(
        query,
        key,
        value,
        cu_seq_lens_q.to(torch.int32),
        cu_seq_lens_k.to(torch.int32),
        int(max_length_q),
        int(max_length_k),
        scale=scaling,
        window_size=CAUSAL,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return output.view(batch, tokens, -1, head_dim), None  # (batch, tokens, heads, head_dim), as sdpa's


def register_varlen() -> None:
    """Make `attn_implementation="varlen"` run `varlen_attention`, with no mask built."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    # Registered mask functions are called with the packed rows; flash attention's returns None for them (and a
    # 2-D padding mask, which the attention function refuses, for padded rows). Without a registered mask function
    # transformers would pass no mask at all, silently ignoring padding.
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)
