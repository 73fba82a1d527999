"""Error lines: one line, no Python class name, the message of an error raised in a DataLoader worker."""

from __future__ import annotations

import pytest


class _Refuses:
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        raise ValueError(f"dataset split 'train', row {index}: too long for dataset.seq_length")


def test_an_error_raised_in_a_dataloader_worker_becomes_its_own_message():
    import torch

    from nvlcore.cli.errors import one_line

    loader = torch.utils.data.DataLoader(_Refuses(), num_workers=1)
    with pytest.raises(ValueError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what the user saw before
    assert one_line(info.value) == "dataset split 'train', row 0: too long for dataset.seq_length"


def test_plain_errors_lose_only_their_class_name():
    from nvlcore.cli.errors import one_line

    assert one_line(KeyError("model.x")) == "model.x"
    assert one_line(RuntimeError("first\n  second")) == "first second"
    assert one_line(RuntimeError()) == "RuntimeError"


def test_tensor_parallel_mismatch_names_what_runs_on_this_machine():
    from nvlcore.parallel import tensor_parallel_mismatch

    assert "use --nproc-per-node 8 (this machine has 8 GPU(s)) or model.tensor_model_parallel_size=1" in \
        tensor_parallel_mismatch(4, 1, gpus=8)
    assert "model.tensor_model_parallel_size=2 (keeps 6 process(es)), or --nproc-per-node 4" in \
        tensor_parallel_mismatch(4, 6, gpus=0)


def test_metrics_jsonl_appears_with_its_first_row(tmp_path):
    """A run that fails before its first iteration leaves no empty metrics.jsonl."""
    from nvlcore.training.loggers import JsonlLogger

    path = tmp_path / "run" / "metrics.jsonl"
    JsonlLogger(path).close()
    assert not path.exists()
    lg = JsonlLogger(path)
    lg.log({"loss": 1.0}, step=1)
    lg.close()
    assert path.read_text() == '{"iteration": 1, "loss": 1.0}\n'
