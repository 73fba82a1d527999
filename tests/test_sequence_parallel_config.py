"""``model.sequence_parallel``: refused at load where it cannot work (TP=1, a PEFT method), accepted
otherwise; a bridge without sequence parallelism refuses it naming the key."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("overrides, needle", [
    (["model.sequence_parallel=true", "model.tensor_model_parallel_size=1"],
     "model.sequence_parallel=true needs model.tensor_model_parallel_size > 1 (it is 1)"),
    (["model.sequence_parallel=true", "model.tensor_model_parallel_size=2", "peft.method=lora"],
     "model.sequence_parallel=true is for full fine-tuning"),
    (["model.sequence_parallel=true", "model.tensor_model_parallel_size=2",
      "mixed_precision=bf16_with_fp8_current_scaling_mixed"],
     "model.sequence_parallel=true does not run FP8 matmuls yet"),
])
def test_sequence_parallelism_is_refused_at_load_where_it_cannot_work(overrides: list[str], needle: str) -> None:
    from nvlcore.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_sequence_parallelism_at_tp2_loads() -> None:
    from nvlcore.config import load_config

    cfg = load_config([], ["model.sequence_parallel=true", "model.tensor_model_parallel_size=2"])
    assert cfg.model.sequence_parallel is True


def test_a_bridge_without_sequence_parallelism_refuses_it_naming_the_key() -> None:
    from types import SimpleNamespace

    from nvlcore.bridge import ModelBridge

    with pytest.raises(ValueError, match=r"model.sequence_parallel=true: model bridge 'plain' has no sequence"):
        ModelBridge.set_sequence_parallel(SimpleNamespace(name="plain"), None)  # type: ignore[arg-type]
