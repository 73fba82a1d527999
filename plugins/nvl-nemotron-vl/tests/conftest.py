"""Shared fixtures of the model tests: one tiny toy checkpoint per session, and the TP=2 run."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory):
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "tiny", "tiny", seed=3)


@pytest.fixture(scope="session")
def tiny_cfg(tiny_toy):
    from nvl_nemotron_vl.config import NemotronVLConfig

    return NemotronVLConfig.from_hf_dir(tiny_toy)
