"""The toy tokenizer: real token layout, real chat template, deterministic files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from nvl_nemotron_vl.toy_tokenizer import BASE_VOCAB_SIZE, MULTIMODAL_TOKENS, write_toy_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    d = tmp_path_factory.mktemp("toy_tok")
    return d, write_toy_tokenizer(d)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir[0])


def test_ids_follow_the_real_layout(tok_dir, tokenizer) -> None:
    _, ids = tok_dir
    assert (ids["<SPECIAL_10>"], ids["<SPECIAL_11>"], ids["<SPECIAL_12>"]) == (10, 11, 12)
    assert (ids["unk"], ids["bos"], ids["eos"], ids["pad"]) == (0, 1, 12, 0)
    # Multimodal tokens come right after the base vocabulary, in Megatron's order.
    assert [ids[t] for t in MULTIMODAL_TOKENS] == list(range(BASE_VOCAB_SIZE, BASE_VOCAB_SIZE + len(MULTIMODAL_TOKENS)))
    assert ids["vocab_size"] == len(tokenizer) == BASE_VOCAB_SIZE + len(MULTIMODAL_TOKENS)
    for token in (*MULTIMODAL_TOKENS, "<SPECIAL_10>", "<think>", "</think>"):
        assert tokenizer.convert_tokens_to_ids(token) == ids[token]
        assert tokenizer(token, add_special_tokens=False).input_ids == [ids[token]]
    assert tokenizer.eos_token == "<SPECIAL_12>" and tokenizer.eos_token_id == 12
    assert tokenizer.pad_token_id == 0


def test_no_bos_and_text_round_trips(tokenizer) -> None:
    text = "Frame 1 sampled at 0.00 seconds: <img><video></img>\nÜber 45,500 ₩ — naïve café 🙂"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer(text).input_ids == ids  # no BOS/EOS even with the default add_special_tokens
    assert len(ids) < len(text.encode())  # merges are learnt: fewer tokens than bytes


def test_chat_template_matches_reference_prompts(tokenizer) -> None:
    image_prompt = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image. /no_think"}]}
    ]
    assert tokenizer.apply_chat_template(image_prompt, tokenize=False, add_generation_prompt=True) == (
        "<SPECIAL_10>System\n\n<SPECIAL_11>User\n<image>Describe this image.\n<SPECIAL_11>Assistant\n<think></think>"
    )
    multi = [
        {"role": "system", "content": "Be brief. /no_think"},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "<think>hmm</think> A dog runs."},
        {"role": "user", "content": "Why? /think"},
    ]
    assert tokenizer.apply_chat_template(multi, tokenize=False, add_generation_prompt=True) == (
        "<SPECIAL_10>System\nBe brief.\n"
        "<SPECIAL_11>User\n<video>What happens?\n"
        "<SPECIAL_11>Assistant\nA dog runs.\n<SPECIAL_12>\n"
        "<SPECIAL_11>User\nWhy?\n"
        "<SPECIAL_11>Assistant\n<think>\n"
    )
    # The last flag wins: /think then /no_think in later turns switches reasoning off.
    flip = [{"role": "system", "content": "/think"}, {"role": "user", "content": "hi /no_think"}]
    assert tokenizer.apply_chat_template(flip, tokenize=False, add_generation_prompt=True).endswith(
        "<SPECIAL_11>User\nhi\n<SPECIAL_11>Assistant\n<think></think>"
    )


def test_files_are_deterministic(tmp_path: Path, tok_dir) -> None:
    write_toy_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        a = hashlib.sha256((tok_dir[0] / name).read_bytes()).hexdigest()
        b = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert a == b, name
