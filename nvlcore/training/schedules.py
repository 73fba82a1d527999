"""Learning-rate and weight-decay schedules, with Megatron-Core's ``OptimizerParamScheduler`` semantics.

Both are pure functions of the number of optimizer updates taken so far (``step``): the update
with index ``step`` (0-based) uses ``lr(step)``. As in Megatron, the very first update uses
``lr_warmup_init`` (0 by default) and the learning rate reaches ``lr`` after ``lr_warmup_iters``
updates. A skipped iteration (non-finite loss or gradient) does not advance ``step``.
Megatron counts in samples; with a fixed global batch size that is the same schedule.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from nvlcore.config import NvlConfig

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


@attrs.frozen
class LRSchedule:
    """Warm-up then decay.

    :param max_lr: peak learning rate (``optimizer.lr``).
    :param min_lr: floor after decay (``optimizer.min_lr``).
    :param warmup_iters: updates of linear warm-up (``scheduler.lr_warmup_iters``).
    :param warmup_init: learning rate of the first update (``scheduler.lr_warmup_init``).
    :param decay_iters: update at which decay ends (``scheduler.lr_decay_iters``, default ``train.train_iters``).
    :param decay_style: one of :data:`LR_DECAY_STYLES`. ``WSD`` (warm-up, stable, decay) keeps ``max_lr``
        until the last ``wsd_decay_iters`` updates before ``decay_iters``, then decays to ``min_lr``.
    :param wsd_decay_iters: length of the WSD schedule's final decay (``scheduler.lr_wsd_decay_iters``).
    :param wsd_decay_style: its shape, one of :data:`WSD_DECAY_STYLES` (``scheduler.lr_wsd_decay_style``).
    """

    max_lr: float
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_init: float = 0.0
    decay_iters: int = 1
    decay_style: str = "cosine"
    wsd_decay_iters: int | None = None
    wsd_decay_style: str = "exponential"

    def __attrs_post_init__(self) -> None:
        if self.decay_style not in LR_DECAY_STYLES:
            raise ValueError(
                f"scheduler.lr_decay_style={self.decay_style!r}; choose from {', '.join(LR_DECAY_STYLES)}"
            )
        if self.decay_style == "WSD":
            if not self.wsd_decay_iters or self.wsd_decay_iters <= 0:
                raise ValueError("scheduler.lr_decay_style=WSD needs scheduler.lr_wsd_decay_iters > 0 "
                                 "(the updates of its final decay)")
            if self.wsd_decay_style not in WSD_DECAY_STYLES:
                raise ValueError(f"scheduler.lr_wsd_decay_style={self.wsd_decay_style!r}; choose from "
                                 f"{', '.join(WSD_DECAY_STYLES)}")
        if self.min_lr > self.max_lr:
            raise ValueError(f"optimizer.min_lr ({self.min_lr}) is larger than optimizer.lr ({self.max_lr})")
        if self.warmup_iters < 0:
            raise ValueError(f"scheduler.lr_warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.decay_style != "constant" and self.decay_iters <= self.warmup_iters:
            raise ValueError(
                f"scheduler.lr_decay_iters ({self.decay_iters}) must be larger than scheduler.lr_warmup_iters "
                f"({self.warmup_iters}); shorten the warm-up (scheduler.lr_warmup_iters) or lengthen the decay "
                "(scheduler.lr_decay_iters, default train.train_iters)"
            )

    def __call__(self, step: int) -> float:
        if self.warmup_iters > 0 and step <= self.warmup_iters:
            return self.warmup_init + (self.max_lr - self.warmup_init) * step / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if step > self.decay_iters:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            warm = max(self.warmup_iters, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(warm) / math.sqrt(max(step, 1)))
        ratio = (step - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "WSD":
            assert self.wsd_decay_iters is not None
            anneal_start = self.decay_iters - self.wsd_decay_iters
            if step <= anneal_start:
                coeff = 1.0
            else:
                r = (step - anneal_start) / self.wsd_decay_iters
                coeff = {
                    "linear": lambda: 1.0 - r,
                    "cosine": lambda: 0.5 * (math.cos(math.pi * r) + 1.0),
                    "exponential": lambda: 2.0 * math.pow(0.5, r) - 1.0,
                    "minus_sqrt": lambda: 1.0 - math.sqrt(r),
                }[self.wsd_decay_style]()
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)


@attrs.frozen
class WeightDecaySchedule:
    """Weight decay from ``start`` to ``end`` over ``incr_iters`` updates (Megatron's ``wd_incr_style``).

    The recipe's effective weight decay is ``start = end = 0.033`` ("constant"), which replaces
    ``optimizer.weight_decay`` as in Megatron-Bridge (``override_opt_param_scheduler``).
    """

    start: float
    end: float
    incr_iters: int = 1
    style: str = "constant"

    def __attrs_post_init__(self) -> None:
        if self.style not in WD_INCR_STYLES:
            raise ValueError(
                f"scheduler.weight_decay_incr_style={self.style!r}; choose from {', '.join(WD_INCR_STYLES)}"
            )
        if self.style == "constant" and self.start != self.end:
            raise ValueError(
                "scheduler.weight_decay_incr_style='constant' needs start_weight_decay == end_weight_decay "
                f"(got {self.start} and {self.end})"
            )

    def __call__(self, step: int) -> float:
        if self.style == "constant" or self.incr_iters <= 0:
            return self.end
        ratio = min(max(step / self.incr_iters, 0.0), 1.0)
        if self.style == "linear":
            coeff = ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return self.start + coeff * (self.end - self.start)


def schedules_for(cfg: NvlConfig) -> tuple[LRSchedule, WeightDecaySchedule]:
    """The learning-rate and weight-decay schedules of a resolved config (``scheduler``, ``optimizer`` and
    ``train`` sections; ``lr_warmup_fraction`` of the decay length wins over ``lr_warmup_iters``)."""
    sc = cfg.scheduler
    decay_iters = sc.lr_decay_iters or cfg.train.train_iters
    warmup = sc.lr_warmup_iters
    if sc.lr_warmup_fraction is not None:
        warmup = int(sc.lr_warmup_fraction * decay_iters)
    style = sc.lr_decay_style
    lr = LRSchedule(max_lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr, warmup_iters=warmup,
                    warmup_init=sc.lr_warmup_init, decay_iters=decay_iters, decay_style=style,
                    wsd_decay_iters=sc.lr_wsd_decay_iters, wsd_decay_style=sc.lr_wsd_decay_style)
    start = sc.start_weight_decay if sc.start_weight_decay is not None else cfg.optimizer.weight_decay
    end = sc.end_weight_decay if sc.end_weight_decay is not None else cfg.optimizer.weight_decay
    wd = WeightDecaySchedule(start=start, end=end, incr_iters=cfg.train.train_iters, style=sc.weight_decay_incr_style)
    return lr, wd
