"""Train the tiny test model: ``python run_tiny.py HF_DIR [overrides...]`` (one rank, or under torchrun)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_plugin  # noqa: E402

from nvlcore.config import load_config, resolve_config  # noqa: E402
from nvlcore.training.finetune import run_finetune  # noqa: E402

DEFAULTS = [
    "model.tensor_model_parallel_size=1", "dataset.maker_name=tiny_copy", "dataset.num_workers=0",
    "dataset.seq_length=64", "train.train_iters=30", "train.global_batch_size=4", "optimizer.lr=3e-3",
    "optimizer.min_lr=3e-4", "logger.log_interval=1", "checkpoint.save_interval=10", "validation.eval_iters=0",
]


def main(argv: list[str]) -> None:
    hf, overrides = argv[0], argv[1:]
    manager = tiny_plugin.manager()
    cfg = load_config([], [*DEFAULTS, f"model.hf_model_path={hf}", f"checkpoint.pretrained_checkpoint={hf}",
                           *overrides],
                      plugins=manager)
    resolve_config(cfg)
    run_finetune(cfg, manager=manager)


if __name__ == "__main__":
    main(sys.argv[1:])
