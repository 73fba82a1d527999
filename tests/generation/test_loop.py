"""The decode loop: equality with transformers' ``generate`` (greedy and seeded sampling, left-padded
batches), the no-cache reference, stop tokens and per-row finished flags."""

from __future__ import annotations

import io

import pytest
import torch

from nvlcore.generation import (
    GenerationOutput,
    Generator,
    NoCacheReference,
    SamplingParams,
    build_conversation,
    generate_tokens,
    left_pad,
    merge_model_inputs,
)

VOCAB = 97
EOS = 5
PAD = 0


@pytest.fixture(scope="module")
def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    # sharper distributions so that greedy and sampled runs hit the stop token sometimes
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # what transformers' generate does for left padding
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


class HFCached:
    """The decode protocol over a transformers causal LM and its DynamicCache (test adapter)."""

    def __init__(self, hf) -> None:
        self.hf = hf

    def parameters(self):
        return self.hf.parameters()

    def allocate_cache(self, batch_size, max_length, *, dtype, device):
        from transformers import DynamicCache

        return {"kv": DynamicCache(config=self.hf.config)}

    def prefill(self, input_ids, *, attention_mask, cache):
        pos = _positions(attention_mask)
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, cache=cache["kv"],
                      use_cache=True)
        cache["mask"], cache["pos"] = attention_mask, pos[:, -1:]
        return out.logits[:, -1]

    def decode_step(self, token_ids, cache):
        cache["mask"] = torch.cat([cache["mask"], torch.ones_like(cache["mask"][:, :1])], dim=1)
        cache["pos"] = cache["pos"] + 1
        out = self.hf(
            input_ids=token_ids[:, None], attention_mask=cache["mask"], position_ids=cache["pos"], cache=cache["kv"],
            use_cache=True,
        )
        return out.logits[:, -1]


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(6, VOCAB, (n,), generator=g) for n in (7, 3, 11)]


def _hf_generate(hf, ids, mask, n, **kw) -> list[list[int]]:
    out = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, eos_token_id=EOS, pad_token_id=PAD, **kw
    )[:, ids.shape[1] :]
    rows = []
    for r in out.tolist():
        rows.append(r[: r.index(EOS) + 1] if EOS in r else r)
    return rows


def test_greedy_batch_equals_transformers_generate(hf_llama) -> None:
    ids, mask = left_pad(_prompts(), PAD)
    ref = _hf_generate(hf_llama, ids, mask, 12, do_sample=False)
    got = generate_tokens(HFCached(hf_llama), ids, mask, max_new_tokens=12, stop_token_ids=[EOS], pad_token_id=PAD)
    assert got.token_ids == ref


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 20, 0.9), (1.3, 5, 0.6)])
def test_seeded_sampling_equals_transformers_generate(hf_llama, temperature, top_k, top_p) -> None:
    ids, mask = left_pad(_prompts(), PAD)
    torch.manual_seed(123)  # transformers samples from the global generator
    ref = _hf_generate(hf_llama, ids, mask, 10, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=123)
    got = generate_tokens(HFCached(hf_llama), ids, mask, max_new_tokens=10, sampling=params, stop_token_ids=[EOS],
                          pad_token_id=PAD)
    assert got.token_ids == ref


def test_no_cache_reference_equals_cached_path(hf_llama) -> None:
    def forward(input_ids, attention_mask):
        return hf_llama(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=_positions(attention_mask)).logits

    ids, mask = left_pad(_prompts(), PAD)
    a = generate_tokens(HFCached(hf_llama), ids, mask, max_new_tokens=9, stop_token_ids=[EOS])
    b = generate_tokens(NoCacheReference(forward), ids, mask, max_new_tokens=9, stop_token_ids=[EOS])
    assert a.token_ids == b.token_ids


class Scripted:
    """Emits a fixed token sequence per row and records what it was fed."""

    def __init__(self, scripts: list[list[int]], vocab: int = 16) -> None:
        self.scripts, self.vocab, self.fed = scripts, vocab, []

    def allocate_cache(self, batch_size, max_length, *, dtype, device):
        self.max_length = max_length
        return {"step": 0}

    def _logits(self, step: int) -> torch.Tensor:
        out = torch.full((len(self.scripts), self.vocab), -10.0)
        for r, s in enumerate(self.scripts):
            out[r, s[min(step, len(s) - 1)]] = 10.0
        return out

    def prefill(self, input_ids, *, attention_mask, cache, **inputs):
        self.inputs = inputs
        return self._logits(0)

    def decode_step(self, token_ids, cache):
        self.fed.append(token_ids.tolist())
        cache["step"] += 1
        return self._logits(cache["step"])


def test_rows_stop_independently_and_finished_rows_are_fed_padding() -> None:
    model = Scripted([[3, 4, EOS, 9, 9], [7, 7, 7, 7, 7], [EOS, 1, 1]])
    ids, mask = left_pad([[1, 2, 3], [1], [2, 2]], PAD)
    steps: list[tuple[int, list[int], list[bool]]] = []
    out = generate_tokens(
        model, ids, mask, max_new_tokens=4, stop_token_ids=[EOS], pad_token_id=PAD, on_step=lambda *a: steps.append(a)
    )
    assert out.token_ids == [[3, 4, EOS], [7, 7, 7, 7], [EOS]]
    assert out.finish_reasons == ["stop", "length", "stop"]
    # the stop token itself is fed once (it is the row's last real token), padding afterwards
    assert model.fed == [[3, 7, EOS], [4, 7, PAD], [EOS, 7, PAD]]
    assert [s[2] for s in steps] == [[True] * 3, [True, True, False], [True, True, False], [False, True, False]]
    assert out.prompt_tokens == 6 and out.steps == 4
    assert out.decode_tokens == 8 - 3  # all generated tokens but the one per row that prefill made
    assert model.max_length == 3 + 4


def test_all_rows_stopping_ends_the_loop_early() -> None:
    model = Scripted([[2, EOS, 9], [EOS, 9, 9]])
    out = generate_tokens(model, torch.ones(2, 2, dtype=torch.long), max_new_tokens=50, stop_token_ids=[EOS])
    assert out.token_ids == [[2, EOS], [EOS]] and out.steps == 2 and len(model.fed) == 1


def test_bad_inputs_are_refused() -> None:
    model = Scripted([[1]])
    with pytest.raises(ValueError, match="left-padded"):
        generate_tokens(model, torch.tensor([[4, 0]]), torch.tensor([[1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_tokens(model, torch.tensor([[4]]), max_new_tokens=0)
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([[1], []], 0)


def test_merge_model_inputs_keeps_row_order() -> None:
    a = {"pixel_values": torch.zeros(2, 3), "num_tiles": [2]}
    b = {"pixel_values": torch.empty(0, 3)}
    c = {"pixel_values": torch.ones(1, 3), "num_tiles": [1]}
    m = merge_model_inputs([a, b, c])
    assert m["pixel_values"].shape == (3, 3) and m["pixel_values"][2].eq(1).all()
    assert m["num_tiles"] == [2, 1]


class CharTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids if not (skip_special_tokens and i == EOS))


def test_generator_end_to_end_with_streaming() -> None:
    model = Scripted([[2, 3, EOS, 9], [7, 8, 9, 10]])
    prompts = {"one": [1, 2, 3], "two": [4]}

    def prepare(conv):
        text = conv["conversation"][-1]["content"][-1]["text"]
        return {"input_ids": torch.tensor(prompts[text]), "pixel_values": torch.zeros(len(text), 3)}

    buf = io.StringIO()
    outs: list[GenerationOutput] = []
    gen = Generator(model, CharTok(), prepare, stop_token_ids=[EOS], pad_token_id=PAD)
    res = gen.generate(
        [build_conversation("one"), build_conversation("two")], max_new_tokens=4, stream=buf, on_output=outs.append
    )
    assert [r.text for r in res] == ["cd", "hijk"]
    assert res[0].token_ids == [2, 3, EOS] and res[0].finish_reason == "stop"
    assert res[1].prompt_token_ids == [4] and res[1].finish_reason == "length"
    assert buf.getvalue() == "cd\n"
    assert model.inputs["pixel_values"].shape == (6, 3)
    assert set(res[0].as_json()) == {
        "text", "prompt_token_ids", "token_ids", "finish_reason", "prefill_tokens_per_s", "decode_tokens_per_s",
    }
    assert outs[0].decode_tokens_per_s > 0


def test_build_conversation_matches_the_original_prompts(tmp_path) -> None:
    imgs = [tmp_path / "a.png", tmp_path / "b.png"]
    multi = build_conversation("Compare.", images=imgs, system_prompt="/no_think")
    assert multi["conversation"][0] == {"role": "system", "content": [{"type": "text", "text": "/no_think"}]}
    user = multi["conversation"][1]["content"]
    assert [c.get("text", c["type"]) for c in user] == ["Image-1: ", "image", "\nImage-2: ", "image", "\nCompare."]
    single = build_conversation("Describe this image.", images=imgs[:1])["conversation"][0]["content"]
    assert [c["type"] for c in single] == ["image", "text"]
    video = build_conversation("What happens?", video=tmp_path / "v.mp4")["conversation"][0]["content"]
    assert video[0] == {"type": "video", "path": str(tmp_path / "v.mp4")} and video[1]["text"] == "\nWhat happens?"
    with pytest.raises(ValueError):
        build_conversation("x", images=imgs, video="v.mp4")
