"""The character tokenizer: round trips, special tokens, saved as tokenizer.json and reloaded through the
same path as real checkpoints (including a foreign BPE tokenizer with its own special tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from minirl_async.config import load_config
from minirl_async.tasks.base import Prompt
from minirl_async.tasks.tokenizer import Tokenizer, build_char_tokenizer, load_tokenizer


def test_round_trip_and_special_tokens() -> None:
    tok = build_char_tokenizer()
    text = "347+85=7+5=12,4+8+1=13####432\nsort:528= rev"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == 100
    assert tok.encode_prompt(Prompt("12+3=")) == [tok.bos_id] + tok.encode("12+3=")
    assert tok.encode_response("15")[-1] == tok.eos_id
    assert tok.decode(tok.encode_response("15")) == "15"  # specials are skipped when decoding
    assert tok.encode("é") == [3]  # unknown character -> <unk>


def test_saved_tokenizer_json_reloads_identically(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    tok.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # what any checkpoint loader uses
    text = "9+9=9+9=18####18"
    assert again.encode(text) == tok.encode(text) == raw.encode(text).ids
    assert (again.pad_id, again.bos_id, again.eos_id, again.vocab_size) == (0, 1, 2, 100)
    cfg = load_config(None, [])
    assert load_tokenizer(cfg, tmp_path).encode(text) == tok.encode(text)


def test_foreign_checkpoint_tokenizer(tmp_path: Path) -> None:
    # A real checkpoint brings a BPE tokenizer with its own special tokens named in tokenizer_config.json.
    bpe = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["the answer is 42", "what is six times seven"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "<|endoftext|>", "<|im_end|>"]))
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>", "bos_token": None}))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.eos_id == bpe.token_to_id("<|im_end|>") and tok.pad_id == bpe.token_to_id("<|endoftext|>")
    assert tok.bos_id is None
    assert tok.encode_prompt(Prompt("the answer")) == tok.encode("the answer")
