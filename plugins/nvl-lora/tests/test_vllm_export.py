"""`nvl export --format hf-peft --target vllm` on the tiny toy: every adapter tensor names a module vLLM accepts
(the names read from tests/fixtures/vllm_nemotron_lora.json, copied from vLLM's source), the base written beside
it is the run's model without the served adapters, and peft applying the adapter to that base's language model
(transformers' NemotronHForCausalLM) reproduces the merged export's language model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("nvl_nemotron_vl.model")

from nvl_lora.method import apply_lora  # noqa: E402
from nvl_lora.recipes import LANGUAGE_TARGETS, lora_settings  # noqa: E402
from nvl_lora.state import gather_adapter_state, load_adapter_state  # noqa: E402

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "vllm_nemotron_lora.json").read_text())
MAMBA_TARGETS = ("*language_model*.in_proj", "*language_model*.out_proj")


# ------------------------------------------------------------------------------- vLLM's rules, from the fixture
def vllm_modules(pattern: str) -> set[str]:
    """Full names of the modules vLLM's NemotronH_Nano_VL_V2 puts adapters on, packed ones as the adapter names
    them (``...mixer.q_proj`` for the packed ``qkv_proj``), for a hybrid pattern such as ``M-*-M-``."""
    lm, c = FIXTURE["vl_model"]["language_model"], FIXTURE["causal_lm"]
    packed = c["packed_modules_mapping"]
    out = {f"{lm}.{c['modules'][e]}" for e in c["embedding_modules"]}
    for i, kind in enumerate(pattern):
        parent = f"{lm}.{c['modules']['layer'].format(i=i)}"
        out |= {f"{parent}.{n}" for name in c["layer_linear_modules"][kind] for n in packed.get(name, [name])}
    return out


def expected_lora_modules() -> set[str]:
    """vLLM's ``expected_lora_modules``: the linear modules' last names and the embedding modules, packed names
    replaced by what they pack."""
    c = FIXTURE["causal_lm"]
    supported = {n for layer in c["layer_linear_modules"].values() for n in layer} | set(c["embedding_modules"])
    return {n for s in supported for n in c["packed_modules_mapping"].get(s, [s])}


def rejections(keys: list[str], pattern: str) -> list[str]:
    """Why vLLM would refuse or ignore each adapter tensor (empty: every tensor attaches to a module)."""
    prefix, suffixes = FIXTURE["lora_tensor_prefix"], tuple(FIXTURE["lora_tensor_suffixes"])
    not_lm = tuple(p + "." for p in FIXTURE["vl_model"]["tower_model"] + FIXTURE["vl_model"]["connector"])
    modules, expected = vllm_modules(pattern), expected_lora_modules()
    bad = []
    for key in keys:
        if not key.startswith(prefix) or not key.endswith(suffixes):
            bad.append(f"{key}: not {prefix}<module>.lora_A/B.weight")
            continue
        module = key[len(prefix):].rsplit(".", 2)[0]
        if module.rsplit(".", 1)[-1] not in expected:
            bad.append(f"{key}: vLLM refuses the adapter ({module.rsplit('.', 1)[-1]} is no LoRA module)")
        elif module.startswith(not_lm):
            bad.append(f"{key}: vLLM serves no adapter on the tower or connector")
        elif module not in modules:
            bad.append(f"{key}: no vLLM module {module}: the adapter would attach to nothing")
    return bad


def test_the_check_refuses_what_vllm_refuses_or_ignores() -> None:
    pre = "base_model.model."
    good = [f"{pre}language_model.model.layers.2.mixer.q_proj.lora_A.weight",
            f"{pre}language_model.model.layers.0.mixer.in_proj.lora_B.weight",
            f"{pre}language_model.lm_head.lora_A.weight"]
    assert rejections(good, "M-*-M-") == []
    planted = [f"{pre}language_model.backbone.layers.2.mixer.q_proj.lora_A.weight",  # HF's name, not vLLM's
               f"{pre}language_model.model.layers.2.mixer.linear_qkv.lora_A.weight",  # the training name
               f"{pre}language_model.model.layers.1.mixer.q_proj.lora_A.weight",  # layer 1 is an MLP
               f"{pre}vision_model.radio_model.model.blocks.0.attn.qkv.lora_A.weight",  # the tower
               f"{pre}mlp1.1.lora_A.weight",  # the connector
               "language_model.model.layers.2.mixer.q_proj.lora_A.weight"]  # no PEFT prefix
    assert len(rejections(planted, "M-*-M-")) == len(planted)


# ------------------------------------------------------------------------------------------------- the toy run
@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return Path(write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=5))


def lora_run(toy: Path, root: Path, *, on_vision: bool, targets: tuple[str, ...] | None, on_language: bool = True,
             seed: int = 0) -> Path:
    """A LoRA run's checkpoint as the trainer writes it: the LM recipe (vision tower and projector trained
    fully, so changed here) or both towers' adapters; every adapter random and non-zero."""
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.checkpoint import save_checkpoint

    bridge = NemotronVLBridge.from_hf_dir(toy)
    model = bridge.build_model(dtype=torch.float32, device="cpu", load_weights=True)
    overrides = {"dim": 4, "alpha": 8, **({"target_modules": list(targets)} if targets else {})}
    cfg, _ = lora_settings(on_language, on_vision, peft_overrides=overrides)
    apply_lora(model, cfg, bridge=bridge)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        load_adapter_state(model, {k: v + 0.05 * torch.randn(v.shape, generator=g)
                                   for k, v in gather_adapter_state(model).items()})
        for n, p in model.named_parameters():
            if p.requires_grad and ".adapter." not in n:
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not n.startswith("language_model.") and ".adapter." not in n for n in state) == (not on_vision)
    return save_checkpoint(root, 4, model_state=state, run_config={
        "peft": cfg.to_dict(), "checkpoint": {"pretrained_checkpoint": str(toy)}})


def export(ck: Path, toy: Path, out: Path, **options: Any) -> Path:
    from nvl_lora.hf_peft import HFPeftExporter

    return HFPeftExporter().export(checkpoint=ck, hf_model_path=toy, output=out, target="vllm", **options)


def pattern_of(toy: Path) -> str:
    return json.loads((toy / "config.json").read_text())["llm_config"]["hybrid_override_pattern"]


def check_export(out: Path, toy: Path, r: int) -> list[str]:
    """The exported files against the fixture: the tensors' names, and adapter_config.json as vLLM reads it."""
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    conf = json.loads((out / "adapter_config.json").read_text())
    assert {k[len(FIXTURE["lora_tensor_prefix"]):].rsplit(".", 2)[0] for k in keys} == set(conf["target_modules"])
    for field, value in FIXTURE["peft_config"].items():
        assert conf[field] == value, field
    manifest = json.loads((out / "vllm_serve.json").read_text())
    rank = int(manifest["adapter_args"][manifest["adapter_args"].index("--max-lora-rank") + 1])
    assert rank in FIXTURE["max_lora_ranks"] and rank >= conf["r"] == r
    return rejections(keys, pattern_of(toy))


def test_lm_adapters_have_names_vllm_accepts_and_the_rest_goes_to_the_base(toy: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapters on both towers, Mamba mixers included: the adapter carries the LM's (every one under a name vLLM
    accepts), the vision tower's are merged into OUTPUT/base, which the adapter names as its base. A planted
    wrong name (HF's ``backbone`` prefix, which vLLM's VL model does not have) fails the check."""
    ck = lora_run(toy, tmp_path / "run", on_vision=True, targets=("linear_qkv", "linear_proj", "linear_fc1",
                                                                   "linear_fc2", "in_proj", "out_proj"))
    out = export(ck, toy, tmp_path / "vllm")
    assert check_export(out, toy, 4) == []
    conf = json.loads((out / "adapter_config.json").read_text())
    kinds = {t.rsplit(".", 1)[-1] for t in conf["target_modules"]}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "in_proj", "out_proj"}
    assert conf["base_model_name_or_path"] == str(out / "base") and (out / "base" / "config.json").is_file()

    import nvl_nemotron_vl.vllm_serving as serving

    monkeypatch.setattr(serving, "LM_VLLM_PREFIX", "language_model.backbone.")
    bad = check_export(export(ck, toy, tmp_path / "planted"), toy, 4)
    assert bad and all("attach to nothing" in b for b in bad)


def test_refusals_name_the_option(toy: Path, tmp_path: Path) -> None:
    from nvl_lora.hf_peft import HFPeftExporter
    from nvl_lora.vllm_export import vllm_max_lora_rank

    ck = lora_run(toy, tmp_path / "vit", on_language=False, on_vision=True, targets=None)
    with pytest.raises(ValueError, match="no adapter vLLM can serve"):
        export(ck, toy, tmp_path / "a")
    with pytest.raises(ValueError, match="hf-peft exports for vllm"):
        HFPeftExporter().export(checkpoint=ck, hf_model_path=toy, output=tmp_path / "b", target="sglang")
    with pytest.raises(ValueError, match="for_causal_lm"):
        export(ck, toy, tmp_path / "c", for_causal_lm=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 9, 320)] == [1, 8, 8, 16, 320]


def test_dora_is_refused_for_vllm(toy: Path, tmp_path: Path) -> None:
    from nvl_lora.vllm_export import split_for_vllm
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(toy)
    a, b, m = torch.zeros(4, 8), torch.zeros(8, 4), torch.ones(8)
    lm = {"language_model.backbone.layers.1.mixer.up_proj": (a, b, m)}
    with pytest.raises(ValueError, match="DoRA"):
        split_for_vllm(bridge, {"language_model.decoder.layers.1.mlp.linear_fc1": lm})
    vit = {"vision_model.radio_model.model.blocks.0.mlp.fc1": (a, b, m)}
    served, merged = split_for_vllm(bridge, {"x": {"language_model.backbone.layers.1.mixer.up_proj": (a, b)},
                                             "v": vit})
    assert list(served) == ["language_model.model.layers.1.mixer.up_proj"] and merged == {"v"}


@pytest.mark.slow
def test_peft_applying_the_vllm_adapter_to_its_base_reproduces_the_merged_model(toy: Path, tmp_path: Path) -> None:
    """The README's `--lora-on-language-model` run (vision tower and projector trained fully), Mamba in_proj
    adapted too (peft refuses out_proj on NemotronH). From `nvl export --target vllm` through the CLI:
    OUTPUT/base holds the run's vision tower and projector (equal to `nvl peft merge --format hf`'s) and the
    original language model; the adapter, renamed from vLLM's NemotronHForCausalLM names to transformers'
    (the same names under ``language_model.``), applied by peft to that base's LM gives the merged export's LM
    weights and logits."""
    import peft
    from lora_testing import merge_run_to_hf
    from nemotron_vl_testing import hf_lm_from_toy
    from safetensors.torch import load_file, save_file

    from nvlcore.convert.safetensors_io import SafetensorsReader

    ck = lora_run(toy, tmp_path / "run", on_vision=False, targets=LANGUAGE_TARGETS + MAMBA_TARGETS[:1])
    merged, _ = merge_run_to_hf(toy, ck, tmp_path)  # fp32 base at tmp_path/base32
    out = tmp_path / "vllm"
    proc = subprocess.run([sys.executable, "-m", "nvlcore", "export", "--format", "hf-peft", "--target", "vllm",
                           "--lora-checkpoint", str(ck), "--hf-model-path", str(toy), "--output", str(out),
                           "-O", f"pretrained={tmp_path / 'base32'}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert check_export(out, toy, 4) == []

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        reader = SafetensorsReader(d)
        return reader.read(list(reader.tensors))

    base, full, orig = tensors(out / "base"), tensors(merged), tensors(toy)
    assert base.keys() == full.keys()
    for k in base:
        want = orig[k].float() if k.startswith("language_model.") else full[k]
        assert torch.equal(base[k].float(), want.float()), k
    assert any(not torch.equal(orig[k].float(), full[k].float()) for k in orig if k.startswith("vision_model."))

    lm_dir = tmp_path / "for_causal_lm"
    lm_dir.mkdir()
    rename = {"base_model.model.language_model.model.": "base_model.model.model.", "language_model.model.": "model."}
    adapter = {_rename(k, rename): t for k, t in load_file(str(out / "adapter_model.safetensors")).items()}
    save_file(adapter, str(lm_dir / "adapter_model.safetensors"))
    conf = json.loads((out / "adapter_config.json").read_text())
    conf["target_modules"] = [_rename(t, rename) for t in conf["target_modules"]]
    (lm_dir / "adapter_config.json").write_text(json.dumps(conf))
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = hf_lm_from_toy(out / "base")
    with torch.no_grad():
        before = plain(ids).logits
        peft_model = peft.PeftModel.from_pretrained(plain, str(lm_dir)).eval()
        theirs = peft_model(ids).logits
        ref = hf_lm_from_toy(merged)
        want = ref(ids).logits
    assert (theirs - before).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(theirs, want, rtol=0, atol=1e-4)
    got_w, want_w = peft_model.merge_and_unload().state_dict(), ref.state_dict()
    assert got_w.keys() == want_w.keys()
    for k in want_w:
        torch.testing.assert_close(got_w[k], want_w[k], rtol=0, atol=1e-5, msg=k)


def _rename(name: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name
