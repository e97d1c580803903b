"""Tiny random Llama / Qwen2 / Qwen3 checkpoints saved by transformers, loaded by our loader: logits must match."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

from treadle.engine.batch import SeqChunk
from treadle.engine.config import EngineConfig
from treadle.engine.loader import load_model
from treadle.engine.model_runner import ModelRunner
from treadle.engine.models.hf_weights import CheckpointError
from treadle.engine.tokenizer import ChatTemplateError

COMMON = dict(
    vocab_size=320,  # larger than the tokenizer: the logits width is the model's, not the tokenizer's
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,  # large enough that logits are far from uniform
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "llama3-rope": lambda: LlamaConfig(
        **COMMON,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,  # puts head dims in all three llama3 bands
        },
    ),
    "llama-bias-linear-rope": lambda: LlamaConfig(
        **COMMON,
        attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
    ),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32),  # head_dim != hidden / heads
}
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"


def save_tokenizer(directory: str, chat_template: str | None) -> None:
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(200)]
    rust = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(directory)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param](), dtype=torch.float32).eval()
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path, max_shard_size="200KB")  # several shards + index.json
    save_tokenizer(path, CHAT_TEMPLATE if request.param.startswith("qwen") else None)
    return path, model


def test_logits_match_transformers(checkpoint):
    path, reference = checkpoint
    cfg = EngineConfig(model=path, dtype="float32")
    loaded = load_model(cfg, progress=False)
    runner = ModelRunner(loaded.model, loaded.config, cfg, num_slots=256)
    ids = torch.randint(3, COMMON["vocab_size"], (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ref = reference(torch.tensor([ids])).logits[0]
    slots = list(range(255, 255 - len(ids), -1))  # descending: KV order is the index, not slot order
    prefill = 17
    got = [runner.execute([SeqChunk(ids[:prefill], list(range(prefill)), slots[:prefill], True)])[0]]
    for i in range(prefill, len(ids)):
        got.append(runner.execute([SeqChunk([ids[i]], [i], slots[: i + 1], True)])[0])
    torch.testing.assert_close(torch.stack(got), ref[prefill - 1 :], atol=2e-4, rtol=1e-4)


def test_config_and_tokenizer_from_directory(checkpoint):
    path, reference = checkpoint
    with open(os.path.join(path, "generation_config.json")) as f:
        gen = json.load(f)
    gen["eos_token_id"] = [2, 7]  # Llama-3-style list of stop ids
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    loaded = load_model(EngineConfig(model=path, served_model_name="tiny"), progress=False)
    assert loaded.name == "tiny"
    assert loaded.config.vocab_size == COMMON["vocab_size"]
    assert loaded.config.head_dim == (reference.config.to_dict().get("head_dim") or 64 // 4)
    assert loaded.config.eos_token_ids == loaded.tokenizer.eos_token_ids == [2, 7]
    tok = loaded.tokenizer
    assert tok.encode("w1 w2 zzz", add_special_tokens=False) == [4, 5, 0]
    assert tok.decode([1, 4, 5, 2]) == "w1 w2"
    messages = [{"role": "user", "content": "w3"}]
    if tok.chat_template is None:
        with pytest.raises(ChatTemplateError):
            tok.apply_chat_template(messages)
    else:
        assert tok.apply_chat_template(messages, add_generation_prompt=False) == "<user>w3</s>"


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(EngineConfig(model=str(tmp_path / "missing")), progress=False)
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(EngineConfig(model=str(tmp_path)), progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        load_model(EngineConfig(model=str(tmp_path)), progress=False)
