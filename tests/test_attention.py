"""Attention for packed rows (friction/attention.py) on CPU.

On a CPU, `varlen` runs `per_document_attention`, one SDPA call per document. It is checked against what does not
share its code: each document trained alone, and sdpa's dense block-diagonal mask over the same packed batch. torch's
CUDA varlen kernel does not run here; `resolve` is checked on pretended GPUs.
"""

from __future__ import annotations

import click
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from friction import attention

DOCUMENT_LENGTHS = [[5, 9, 1, 3], [7, 2, 6, 4, 1]]  # two packed rows, as pack writes seq_lengths; 1: a lone token


@pytest.fixture(scope="module")
def varlen() -> str:
    """`attn_implementation="varlen"` registered as the train stage registers it."""
    attention.register_varlen()
    return attention.VARLEN


@pytest.fixture(scope="module")
def tiny_model():
    """A two-layer Qwen2 with grouped-query attention (4 query heads, 2 key-value heads), random weights."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


BOUNDARIES = ["cu_seq_lens", "position_ids"]
"""What a padding-free micro-batch tells the model about its documents: TRL 1.16's collator sends cu_seq_lens_q/k
(and position_ids); TRL 1.15's, of the unsloth set, position_ids alone. Both are checked under either TRL."""


def packed_rows() -> tuple[list[dict], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Packed rows as pack writes them (input_ids, labels, seq_lengths), and their documents one by one."""
    generator = torch.Generator().manual_seed(1)
    rows, documents = [], []
    for lengths in DOCUMENT_LENGTHS:
        ids = torch.randint(0, 97, (sum(lengths),), generator=generator)
        labels = ids.clone()
        start = 0
        for length in lengths:
            labels[start : start + length // 3] = -100  # each document's prompt is not trained on
            documents.append((ids[start : start + length], labels[start : start + length]))
            start += length
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "seq_lengths": lengths})
    return rows, documents


def packed_batch(boundaries: str = "cu_seq_lens") -> tuple[dict, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A padding-free micro-batch made by TRL's own collator, with the `boundaries` it sends (BOUNDARIES), and its
    documents one by one (ids, labels)."""
    rows, documents = packed_rows()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    varlen_keys = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
    batch = {key: value for key, value in batch.items() if key not in varlen_keys}  # what TRL 1.15 sends
    if boundaries == "cu_seq_lens":  # what TRL 1.16 adds, written here from the lengths pack wrote
        lengths = [length for row in DOCUMENT_LENGTHS for length in row]
        cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        batch |= {
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
        }
    return batch, documents


def loss_and_gradients(model, implementation: str, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.set_attn_implementation(implementation)
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def separate_documents_loss_and_gradients(model, documents) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The packed micro-batch's loss (a mean over its labelled tokens) computed one document at a time."""
    model.set_attn_implementation("sdpa")
    model.zero_grad()
    counts = [int((labels[1:] != -100).sum()) for _, labels in documents]  # the shifted labels each one trains on
    total = sum(
        model(input_ids=ids[None], labels=labels[None], use_cache=False).loss * count
        for (ids, labels), count in zip(documents, counts)
        if count
    ) / sum(counts)
    total.backward()
    return total.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_installed_collator_hands_document_boundaries_to_the_model():
    """TRL's own collator, as installed (1.16: cu_seq_lens and position_ids; 1.15: position_ids alone)."""
    rows, _ = packed_rows()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert batch["input_ids"].shape == (1, 38) and "attention_mask" not in batch  # both rows in one sequence
    assert attention.collated_document_lengths(batch) == [5, 9, 1, 3, 7, 2, 6, 4, 1]
    attention.check_collated_documents(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True), rows, "hf")


@pytest.mark.parametrize("boundaries", BOUNDARIES)
def test_both_kinds_of_boundaries_name_the_same_documents(boundaries):
    batch, _ = packed_batch(boundaries)
    assert attention.collated_document_lengths(batch) == [5, 9, 1, 3, 7, 2, 6, 4, 1]


def test_a_collator_that_sends_no_boundaries_stops_the_run():
    """TRL's collator without padding_free pads the rows and sends an attention mask of ones: no documents."""
    rows, _ = packed_rows()
    with pytest.raises(click.ClickException, match="sends neither cu_seq_lens_q/k nor position_ids"):
        attention.check_collated_documents(DataCollatorForLanguageModeling(pad_token_id=0), rows, "hf")


def test_a_collator_whose_boundaries_differ_from_the_packed_rows_stops_the_run():
    rows, _ = packed_rows()
    one_document_per_row = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    unpacked = [{key: value for key, value in row.items() if key != "seq_lengths"} for row in rows]
    with pytest.raises(click.ClickException, match=r"lengths \[18, 20\].*pack wrote \[5, 9, 1, 3, 7, 2, 6, 4\]"):
        attention.check_collated_documents(lambda _: one_document_per_row(unpacked), rows, "hf")


def test_boundaries_from_position_ids_follow_transformers_packed_sequence_rule():
    from transformers.masking_utils import find_packed_sequence_indices

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]])
    cu_seq_lens, longest = attention.boundaries_from_position_ids(position_ids, 2, 10)
    assert cu_seq_lens.tolist() == [0, 3, 5, 6, 10, 17, 20] and cu_seq_lens.dtype == torch.int32 and longest == 7
    documents = find_packed_sequence_indices(position_ids)  # transformers' own: a document index per token
    expected = [int(n) for row in documents for n in torch.unique_consecutive(row, return_counts=True)[1]]
    assert cu_seq_lens.diff().tolist() == expected
    # (1, tokens), as transformers makes position ids for a batch given without them: one document per row
    assert attention.boundaries_from_position_ids(torch.arange(6)[None], 3, 6)[0].tolist() == [0, 6, 12, 18]


def test_varlen_without_any_boundaries_refuses_to_guess(tiny_model, varlen):
    query = torch.zeros(1, 4, 6, 16)
    with pytest.raises(ValueError, match="needs the documents' boundaries.*passed neither"):
        attention.varlen_attention(tiny_model.model.layers[0].self_attn, query, query[:, :2], query[:, :2], None)


def assert_same_loss_and_gradients(actual, expected) -> None:
    (loss, gradients), (expected_loss, expected_gradients) = actual, expected
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("boundaries", BOUNDARIES)
def test_varlen_gives_each_documents_own_loss_and_gradients(tiny_model, varlen, boundaries):
    batch, documents = packed_batch(boundaries)
    assert_same_loss_and_gradients(
        loss_and_gradients(tiny_model, varlen, batch), separate_documents_loss_and_gradients(tiny_model, documents)
    )


@pytest.mark.parametrize("boundaries", BOUNDARIES)
def test_varlen_trains_as_sdpa_with_its_dense_mask_does(tiny_model, varlen, boundaries):
    batch, _ = packed_batch(boundaries)
    assert_same_loss_and_gradients(
        loss_and_gradients(tiny_model, varlen, batch), loss_and_gradients(tiny_model, "sdpa", batch)
    )


@pytest.mark.parametrize("boundaries", BOUNDARIES)
def test_varlen_logits_of_every_token_are_its_documents_alone(tiny_model, varlen, boundaries):
    """Logits, not the loss: the lone-token documents train on no label, but each still gets its own attention."""
    batch, documents = packed_batch(boundaries)
    with torch.no_grad():
        tiny_model.set_attn_implementation(varlen)
        packed = tiny_model(**batch, use_cache=False).logits[0]
        tiny_model.set_attn_implementation("sdpa")
        alone = torch.cat([tiny_model(input_ids=ids[None], use_cache=False).logits[0] for ids, _ in documents])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def block_diagonal_causal_mask(lengths: list[int]) -> torch.Tensor:
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(len(document))
    return (document[:, None] == document[None, :]) & (position[:, None] >= position[None, :])


@pytest.mark.parametrize("key_value_heads", [2, 6], ids=["grouped-query", "one-key-value-head-per-query-head"])
def test_per_document_attention_is_sdpa_with_a_block_diagonal_mask(key_value_heads):
    """The kernel alone, in varlen_attn's layout (tokens, heads, head_dim), forward and backward, in float32."""
    lengths = [1, 17, 4, 1, 30, 9]
    generator = torch.Generator().manual_seed(4)
    query, key, value = (
        torch.randn(sum(lengths), heads, 16, generator=generator, requires_grad=True)
        for heads in (6, key_value_heads, key_value_heads)
    )
    cu_seq = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    grouped = key_value_heads != 6
    output = attention.per_document_attention(
        query,
        key,
        value,
        cu_seq,
        cu_seq,
        max(lengths),
        max(lengths),
        scale=0.3,
        window_size=attention.CAUSAL,
        enable_gqa=grouped,
    )
    expected = F.scaled_dot_product_attention(
        *(t.transpose(0, 1) for t in (query, key, value)),
        attn_mask=block_diagonal_causal_mask(lengths),
        scale=0.3,
        enable_gqa=grouped,
    ).transpose(0, 1)
    assert output.dtype == torch.float32 and output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(output.shape, generator=generator)
    gradients = torch.autograd.grad(output, (query, key, value), upstream)
    expected_gradients = torch.autograd.grad(expected, (query, key, value), upstream)
    for name, gradient, expected_gradient in zip("qkv", gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-6, msg=name)


def test_per_document_attention_refuses_what_it_does_not_compute():
    tokens = torch.zeros(4, 2, 8)
    cu_seq = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="causal"):
        attention.per_document_attention(tokens, tokens, tokens, cu_seq, cu_seq, 2, 2, window_size=(-1, -1))
    with pytest.raises(ValueError, match="same document boundaries"):
        attention.per_document_attention(
            tokens,
            tokens,
            tokens,
            cu_seq,
            torch.tensor([0, 1, 4], dtype=torch.int32),
            2,
            3,
            window_size=attention.CAUSAL,
        )


def test_varlen_without_boundaries_treats_each_row_as_one_document(tiny_model, varlen):
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tiny_model.set_attn_implementation(varlen)
        varlen_logits = tiny_model(input_ids=ids, use_cache=False).logits
        tiny_model.set_attn_implementation("sdpa")
        sdpa_logits = tiny_model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(varlen_logits, sdpa_logits, rtol=1e-5, atol=1e-5)


def test_varlen_refuses_padded_rows_instead_of_ignoring_the_padding(tiny_model, varlen):
    tiny_model.set_attn_implementation(varlen)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="has padding"):
        tiny_model(input_ids=ids, attention_mask=padded, use_cache=False)


def masks_built(monkeypatch, model, implementation: str, batch: dict) -> list:
    """Every mask transformers' masking code builds for one forward pass with `implementation`."""
    built = []
    create_mask = ALL_MASK_ATTENTION_FUNCTIONS[implementation]

    def spy(*args, **kwargs):
        built.append(mask := create_mask(*args, **kwargs))
        return mask

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, implementation, spy)
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        model(**batch, use_cache=False)
    return built


@pytest.mark.parametrize("boundaries", BOUNDARIES)
def test_varlen_builds_no_mask_where_sdpa_builds_a_dense_one(tiny_model, varlen, monkeypatch, boundaries):
    batch, _ = packed_batch(boundaries)
    assert masks_built(monkeypatch, tiny_model, varlen, batch) == [None]
    (dense,) = masks_built(monkeypatch, tiny_model, "sdpa", batch)
    assert dense.shape == (1, 1, 38, 38)  # every score of the micro-batch, most of them masked
    assert int(dense.sum()) == sum(n * (n + 1) // 2 for lengths in DOCUMENT_LENGTHS for n in lengths)


@pytest.mark.e2e  # flex_attention compiles its kernel on first use (about 30 s on this CPU)
@pytest.mark.parametrize("boundaries", BOUNDARIES)
def test_flex_attention_forward_equals_each_document_alone(tiny_model, monkeypatch, boundaries):
    batch, documents = packed_batch(boundaries)
    (block_mask,) = masks_built(monkeypatch, tiny_model, "flex_attention", batch)
    assert type(block_mask).__name__ == "BlockMask"  # blocks, not a dense tensor of scores
    with torch.no_grad():
        packed = tiny_model(**batch, use_cache=False).logits[0]
        tiny_model.set_attn_implementation("sdpa")
        alone = torch.cat([tiny_model(input_ids=ids[None], use_cache=False).logits[0] for ids, _ in documents])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a CUDA GPU of the given compute capability is visible (resolution only: nothing runs on it)."""

    def set_capability(major: int, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_capability


def test_auto_is_per_document_varlen_on_cpu_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.resolve("auto", torch.float32) == attention.VARLEN
    assert "auto uses varlen: no CUDA GPU, so one SDPA call per document" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_asked_for_on_cpu_runs_there_in_any_precision(monkeypatch, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.resolve("varlen", dtype) == attention.VARLEN


@pytest.mark.parametrize("requested", ["flash_attention_4", "flex_attention"])
def test_a_gpu_kernel_asked_for_on_cpu_says_what_to_set(monkeypatch, requested):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        click.ClickException, match=f"attn_implementation: {requested} needs a CUDA GPU.*auto, varlen or sdpa"
    ):
        attention.resolve(requested, torch.bfloat16)


def test_auto_on_a_gpu_takes_a_kernel_that_builds_no_mask(gpu, capsys):
    gpu(9)  # a Hopper without the flash-attn-4 wheel (not installed here)
    assert attention.resolve("auto", torch.bfloat16) == "varlen"
    assert "auto uses varlen (not flash_attention_4: flash-attn-4 is not installed" in capsys.readouterr().out


def test_auto_on_a_gpu_without_a_mask_free_kernel_falls_back_to_sdpa_and_says_why(gpu, capsys):
    gpu(7, 5)  # a Turing: no flash kernel in torch, and no triton installed here for flex_attention
    assert attention.resolve("auto", torch.float16) == "sdpa"
    out = capsys.readouterr().out
    assert "auto uses sdpa, a dense mask per micro-batch" in out and "compute capability 8.0+" in out


def test_flash_kernels_need_half_precision(gpu):
    gpu(9)
    with pytest.raises(click.ClickException, match="varlen, but its kernel computes in bf16 or fp16"):
        attention.resolve("varlen", torch.float32)


def test_flash_attention_4_asked_for_but_missing_says_how_to_install(gpu):
    gpu(9)
    with pytest.raises(click.ClickException, match="flash-attn-4 is not installed.*make flash-attention-4"):
        attention.resolve("flash_attention_4", torch.bfloat16)


def test_the_training_model_loads_with_the_resolved_implementation(demo_params, tiny_manifest_for_attention):
    from friction import modeling

    model, _ = modeling.hf_model_with_adapter(demo_params, tiny_manifest_for_attention)
    assert model.get_base_model().config._attn_implementation == attention.VARLEN  # auto, on this CPU


@pytest.fixture
def tiny_manifest_for_attention(tmp_path, tiny_model_dir):
    import json

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"base_model": {"location": str(tiny_model_dir), "resolved_revision": None}}))
    return manifest
