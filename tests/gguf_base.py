"""The demo's tiny Qwen2 base as a GGUF model that llama.cpp loads, written with the `gguf` package in the tests.

llama.cpp's own `convert_hf_to_gguf.py` stops on the demo tokenizer (its BPE is not in the script's table of known
pre-tokenizer hashes) and imports sentencepiece, so the tests write the base directly: every tensor in f32 under
gguf's own name map, and the vocabulary as llama.cpp's BPE reads it (`gpt2` model, `qwen2` pre-tokenizer: the regex the
demo tokenizer was trained with). llama.cpp then checks it the hard way: its logits must equal transformers'.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file


def token_types(tokenizer_json: dict, vocab_rows: int) -> tuple[list[str], list[int]]:
    """Every token by id, padded to the embedding's rows as llama.cpp wants, with its GGUF token type."""
    vocab: dict[str, int] = dict(tokenizer_json["model"]["vocab"])
    added = {token["content"]: token for token in tokenizer_json["added_tokens"]}
    for content, token in added.items():
        vocab[content] = token["id"]
    by_id = {index: content for content, index in vocab.items()}
    tokens, types = [], []
    for index in range(vocab_rows):
        content = by_id.get(index)
        if content is None:  # the rows the model pads its vocabulary to
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif content in added:  # special ones are control tokens; <think> and </think> are user-defined text pieces
            tokens.append(content)
            types.append(gguf.TokenType.CONTROL if added[content]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(content)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_base_gguf(model_dir: Path, out: Path) -> Path:
    """Write the Qwen2 model of `model_dir` (config.json, model.safetensors, tokenizer.json) to `out` in f32."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "qwen2", config["model_type"]
    blocks = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    writer.add_name("friction demo base")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, types = token_types(tokenizer_json, config["vocab_size"])
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {token: index for index, token in enumerate(tokens)}
    writer.add_bos_token_id(ids[tokenizer_config["bos_token"]])
    writer.add_eos_token_id(ids[tokenizer_config["eos_token"]])
    writer.add_pad_token_id(ids[tokenizer_config["pad_token"]])
    writer.add_add_bos_token(True)  # the base's tokenizer puts BOS before every text, as in training

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, blocks)
    for name, array in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied: llama.cpp uses token_embd as the output when there is no output tensor
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"no GGUF name for {name}"
        writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


if __name__ == "__main__":  # python tests/gguf_base.py data/sources/demo-base models/friction-gguf/demo-base.gguf
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python tests/gguf_base.py MODEL_DIR OUT.gguf")
    print(write_base_gguf(Path(sys.argv[1]), Path(sys.argv[2])))
