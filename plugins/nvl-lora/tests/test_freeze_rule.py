"""The LoRA freeze rule (Megatron-Bridge's): the PEFT recipe decides what is frozen.

With either shipped YAML (both set ``model.freeze_*: False``) and every combination of the two flags,
the config is composed exactly as ``nvl finetune`` does, the tiny toy model is built, frozen and
wrapped as the trainer does, and the parameters that really have ``requires_grad`` are counted per
tower. ``model.freeze_*=False`` never unfreezes a tower the recipe froze; ``model.freeze_*=True``
freezes one in addition; only an explicit ``peft.freeze_*`` unfreezes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvl_nemotron_vl.model")

from nvl_nemotron_vl.recipes import DEFAULT_CONFIG_FILE, VIDEO_CONFIG_FILE  # noqa: E402

TOWERS = ("language_model", "vision_model", "vision_projection")
LM, VIT, PROJ = TOWERS
FLAGS = {
    "language": (True, False),
    "vision": (False, True),
    "both": (True, True),
}
#: Megatron-Bridge's table: towers whose base weights the recipe freezes, and towers with adapters.
RECIPE = {
    "language": ({LM}, {LM}),
    "vision": ({VIT, PROJ}, {VIT, PROJ}),
    "both": ({LM, VIT, PROJ}, {LM, VIT, PROJ}),
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return Path(write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=7))


@pytest.fixture(scope="module")
def manager():
    from nvlcore.testing import make_plugin_manager

    return make_plugin_manager(entry_points=True)


def _trainable(toy: Path, manager, config_file: Path | None, flags: str, overrides: list[str]):
    """Compose as `nvl finetune` does, then build, freeze and wrap as the trainer does.

    :returns: (config, {tower: (base trainable, base total, adapter trainable)}, towers summary).
    """
    from nvl_lora.options import LoRAFlags
    from nvlcore.cli.finetune import compose_config
    from nvlcore.training.finetune import prepare_trainable, resolve_bridge

    language, vision = FLAGS[flags]
    cfg, _ = compose_config(
        manager=manager, hf_model_path=str(toy), pretrained_checkpoint=str(toy),
        config_files=[str(config_file)] if config_file else [],
        overrides=["model.tensor_model_parallel_size=1", *overrides],
        plugin_values=[(LoRAFlags(), {"lora_on_language_model": language, "lora_on_vision_model": vision})],
    )
    bridge = resolve_bridge(cfg.model.hf_model_path, cfg.model.bridge, manager=manager)
    model = bridge.build_model(dtype=torch.float32, device="cpu", init="random", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toy lacks some targets (no LM MLP fc in every layer kind)
        _, towers = prepare_trainable(model, cfg, manager, bridge)
    counts = {t: [0, 0, 0] for t in TOWERS}
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        c = counts.setdefault(top, [0, 0, 0])
        if ".adapter." in name:
            assert p.requires_grad, name
            c[2] += p.numel()
        else:
            c[1] += p.numel()
            c[0] += p.numel() if p.requires_grad else 0
    return cfg, {k: tuple(v) for k, v in counts.items()}, towers


@pytest.mark.parametrize("config_file", [DEFAULT_CONFIG_FILE, VIDEO_CONFIG_FILE, None],
                         ids=["override_example_yaml", "video_yaml", "default"])
@pytest.mark.parametrize("flags", sorted(FLAGS))
def test_the_peft_recipe_decides_what_is_frozen(toy, manager, config_file, flags) -> None:
    # both shipped YAMLs carry model.freeze_*: False (checked: this is what the test is about)
    if config_file is not None:
        assert "freeze_vision_model: False" in config_file.read_text()
    cfg, counts, towers = _trainable(toy, manager, config_file, flags, [])
    frozen, adapted = RECIPE[flags]
    for tower in TOWERS:
        trainable, total, adapters = counts[tower]
        assert total > 0
        if tower in frozen:
            assert trainable == 0, (tower, counts)  # model.freeze_*: False did not unfreeze it
        else:
            assert trainable == total, (tower, counts)  # trained fully
        assert (adapters > 0) == (tower in adapted), (tower, counts)
        assert cfg.peft.options[f"freeze_{tower}"] == (tower in frozen)
    by_name = {t.name: t for t in towers}
    for tower in TOWERS:
        state = by_name[tower].state
        if tower in frozen:
            assert state == "frozen + adapters", (tower, state)
        else:
            assert state == "trained fully", (tower, state)


def test_model_freeze_true_freezes_in_addition(toy, manager) -> None:
    # --lora-on-language-model trains the ViT fully, but model.freeze_vision_model=True freezes it
    _, counts, towers = _trainable(toy, manager, DEFAULT_CONFIG_FILE, "language", ["model.freeze_vision_model=True"])
    assert counts[VIT][0] == 0 and counts[VIT][2] == 0
    assert counts[PROJ][0] == counts[PROJ][1] > 0
    assert counts[LM][0] == 0 and counts[LM][2] > 0
    assert {t.name: t.state for t in towers}[VIT] == "frozen"


@pytest.mark.parametrize("config_file", [DEFAULT_CONFIG_FILE, VIDEO_CONFIG_FILE],
                         ids=["override_example_yaml", "video_yaml"])
def test_only_an_explicit_peft_freeze_unfreezes(toy, manager, config_file, tmp_path: Path) -> None:
    # on the command line
    cfg, counts, _ = _trainable(toy, manager, config_file, "both", ["peft.freeze_vision_model=False"])
    assert cfg.peft.options["freeze_vision_model"] is False and cfg.peft.options["freeze_language_model"] is True
    assert counts[VIT][0] == counts[VIT][1] > 0 and counts[VIT][2] > 0  # trained fully + adapters
    assert counts[LM][0] == 0 and counts[PROJ][0] == 0
    # in the user's own config file
    mine = tmp_path / "mine.yaml"
    mine.write_text(config_file.read_text() + "peft:\n  freeze_vision_projection: false\n")
    cfg, counts, _ = _trainable(toy, manager, mine, "both", [])
    assert cfg.peft.options["freeze_vision_projection"] is False
    assert counts[PROJ][0] == counts[PROJ][1] > 0
    assert counts[LM][0] == 0 and counts[VIT][0] == 0


def test_model_freeze_false_on_the_command_line_does_not_unfreeze(toy, manager) -> None:
    # the original workflow's documented LoRA command line passes these explicitly
    overrides = ["model.freeze_language_model=False", "model.freeze_vision_model=False",
                 "model.freeze_vision_projection=False"]
    cfg, counts, _ = _trainable(toy, manager, DEFAULT_CONFIG_FILE, "both", overrides)
    assert (cfg.peft.options["freeze_language_model"], cfg.peft.options["freeze_vision_model"],
            cfg.peft.options["freeze_vision_projection"]) == (
        True, True, True)
    assert all(counts[t][0] == 0 and counts[t][2] > 0 for t in TOWERS), counts


def test_describe_towers_line() -> None:
    from nvlcore.training.finetune import TowerStatus, describe_towers

    line = describe_towers([TowerStatus(LM, 0, 10, 4), TowerStatus(VIT, 5, 5, 0), TowerStatus(PROJ, 0, 3, 0),
                            TowerStatus("other", 1, 3, 0)])
    assert line == (f"trained fully: {VIT}; with adapters: {LM}; frozen: {PROJ}; partly trained: other")
