"""The training loop: gradient accumulation, token-weighted loss, DP reduction, clipping, schedules.

One *iteration* consumes one global batch (``train.global_batch_size`` samples over all DP ranks,
``num_microbatches`` micro-batches per rank) and makes at most one optimizer update:

1. each micro-batch runs forward (bf16 autocast on GPU) and backward on ``sum(loss * loss_mask)``,
   accumulating fp32 gradients;
2. the loss sum, supervised-token count, real-token count and FLOPs are summed over DP ranks;
3. gradients are summed over DP ranks and divided by the global supervised-token count, so the
   update is the gradient of the mean loss over every supervised token of the global batch
   (token-weighted, however the tokens are split over micro-batches and ranks);
4. the global gradient norm is computed (TP shards once each, replicated parameters once) and
   gradients are clipped to ``optimizer.clip_grad``;
5. if the loss or the norm is not finite the run stops with an error naming the iteration
   (``ddp.check_for_nan_in_grad``, the default, as Megatron); with that flag off, or when the batch
   has no supervised token, the update is skipped: parameters, optimizer state and the LR schedule
   stay where they were, the batch is consumed, the iteration counter advances and
   ``skipped_iterations`` grows;
6. otherwise the update index selects the learning rate and weight decay and AdamW steps.

Checkpoints are written every ``save_interval`` iterations, at the end, and at the first
iteration boundary after SIGTERM/SIGINT (all ranks agree through an all-reduce).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nvlcore.bridge import real_tokens
from nvlcore.training import optim
from nvlcore.training.grads import zero_grads
from nvlcore.training.oom import set_phase
from nvlcore.training.schedules import LRSchedule, WeightDecaySchedule

if TYPE_CHECKING:
    import torch

    from nvlcore.parallel import ParallelContext
    from nvlcore.training.cuda_graphs import LayerGraphs


@attrs.define
class TrainState:
    """Where training stands; saved in every checkpoint's ``train_state.pt``.

    :param iteration: iterations completed (global batches consumed).
    :param consumed_samples: samples trained on so far (the position in the global sample stream when
        unpacked; with packing, the samples in the packed rows, all DP ranks together).
    :param optimizer_steps: updates applied (the LR schedule's position; skipped iterations excluded).
    :param skipped_iterations: iterations whose update was skipped (non-finite loss/gradient).
    :param floating_point_operations_so_far: training FLOPs counted so far.
    :param tokens_so_far: real (non-padding) tokens processed so far.
    """

    iteration: int = 0
    consumed_samples: int = 0
    optimizer_steps: int = 0
    skipped_iterations: int = 0
    floating_point_operations_so_far: float = 0.0
    tokens_so_far: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["step"] = self.iteration  # Megatron-Bridge's name for the iteration
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        names = {f.name for f in attrs.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "iteration" not in kwargs and "step" in d:
            kwargs["iteration"] = int(d["step"])
        return cls(**kwargs)


@attrs.define
class StepResult:
    """One iteration's numbers (all global: summed/reduced over DP ranks)."""

    loss_sum: float
    supervised_tokens: float
    tokens: float
    flops: float
    grad_norm: float
    lr: float
    weight_decay: float
    skipped: bool
    reason: str = ""
    samples: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.supervised_tokens if self.supervised_tokens > 0 else float("nan")


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to ``device`` (non-blocking from pinned memory); other values unchanged."""
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def batch_samples(batch: Mapping[str, Any]) -> int:
    """Samples in a micro-batch: its rows, or with packing the samples packed into them (``num_samples``)."""
    n = batch.get("num_samples")
    if n is not None:
        return int(n.sum())
    return int(batch["input_ids"].shape[0])


class StopRequest:
    """Records SIGTERM/SIGINT so the loop can save at the next iteration boundary.

    In a single process a second signal of the same kind falls through to the previous handler (Ctrl-C
    twice stops at once). Under torchrun (``escalate=False``) every worker gets a Ctrl-C twice, from the
    terminal and forwarded by the launcher, so repeats are absorbed; the launcher kills workers that
    do not finish in its shutdown timeout.
    """

    def __init__(self, *, escalate: bool = True) -> None:
        self.escalate = escalate
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.escalate and self.signum == signum:
            prev = self._previous.get(signum)
            self.uninstall()
            if callable(prev):
                prev(signum, frame)
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum


@attrs.define
class LoopSettings:
    """What the loop needs from the config (see :func:`nvlcore.training.finetune.loop_settings`)."""

    train_iters: int
    global_batch_size: int
    num_microbatches: int
    clip_grad: float = 1.0
    log_interval: int = 1
    save_interval: int | None = None
    eval_interval: int | None = None
    eval_iters: int = 0
    generate_eval_interval: int | None = None
    autocast_dtype: Any = None
    exit_signal_saves: bool = True
    manual_gc_interval: int = 0
    exit_interval: int | None = None
    exit_duration_s: float | None = None
    #: raise on a non-finite loss or gradient instead of skipping the update (ddp.check_for_nan_in_grad)
    fail_on_nan_grad: bool = False
    #: collect garbage before and after each validation when manual GC is on (train.manual_gc_eval)
    manual_gc_eval: bool = True
    #: gradient all-reduce bucket size in bytes (ddp.bucket_size x 4; None = optim.BUCKET_BYTES)
    bucket_bytes: int | None = None
    #: autocast's weight-cast cache (off under CUDA graphs: make_graphed_callables refuses it)
    autocast_cache: bool = True


class Trainer:
    """Runs iterations over an iterator of micro-batches; see the module docstring for one iteration.

    :param model: the training model (forward with ``labels`` returns the per-token loss ``[B, L]``).
    :param ctx: process layout.
    :param optimizer: from :func:`nvlcore.training.optim.build_optimizer`.
    :param named_params: the trainable parameters, as given to the optimizer.
    :param lr_schedule: learning rate per update index.
    :param wd_schedule: weight decay per update index.
    :param settings: loop settings.
    :param state: where to start (a fresh :class:`TrainState` or a resumed one).
    :param flops_fn: training FLOPs (fwd+bwd) of one micro-batch, or None.
    :param loggers: metric sinks, used on rank 0.
    :param save_fn: ``save_fn(state)`` writes a checkpoint.
    :param eval_fn: ``eval_fn() -> (loss_sum, supervised_tokens)`` over the validation batches, or None.
    :param generate_eval_fn: ``generate_eval_fn() -> {metric: value}``: generation-based validation
        (``validation.generate_eval_interval``; collective, called on every rank), or None.
    :param first_step_fn: called once after this run's first iteration (e.g. to report what ran), or None.
    :param cuda_graphs: per-layer CUDA graphs (``model.cuda_graph_impl=local``), or None: told before each
        step's first backward (gradients it must pre-allocate) and after each step (capture after warm-up).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        ctx: ParallelContext,
        optimizer: torch.optim.Optimizer,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        lr_schedule: LRSchedule,
        wd_schedule: WeightDecaySchedule,
        settings: LoopSettings,
        state: TrainState | None = None,
        flops_fn: Callable[[Mapping[str, Any]], float] | None = None,
        loggers: Sequence[Any] = (),
        save_fn: Callable[[TrainState], Any] | None = None,
        eval_fn: Callable[[], tuple[float, float]] | None = None,
        generate_eval_fn: Callable[[], Mapping[str, float]] | None = None,
        print_fn: Callable[[str], None] = print,
        first_step_fn: Callable[[], None] | None = None,
        cuda_graphs: LayerGraphs | None = None,
    ) -> None:
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.first_step_fn = first_step_fn
        self.ctx = ctx
        self.optimizer = optimizer
        self.named_params = list(named_params)
        self.params = [p for _, p in self.named_params]
        self.lr_schedule = lr_schedule
        self.wd_schedule = wd_schedule
        self.settings = settings
        self.state = state or TrainState()
        self.flops_fn = flops_fn
        self.loggers = list(loggers) if ctx.is_main else []
        self.save_fn = save_fn
        self.eval_fn = eval_fn
        self.generate_eval_fn = generate_eval_fn
        self.print = print_fn if ctx.is_main else (lambda _msg: None)
        from nvlcore.parallel import launched_by_torchrun

        self.stop = StopRequest(escalate=not launched_by_torchrun())
        self.history: list[StepResult] = []
        self.last_saved_iteration: int | None = None
        #: The signal (``SIGTERM``...) that stopped :meth:`run` early, after its save; ``None`` otherwise.
        self.stopped_by: str | None = None

    # -- one iteration ---------------------------------------------------------------------------
    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.settings.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.settings.autocast_dtype,
                              cache_enabled=self.settings.autocast_cache)

    def forward_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of loss * loss_mask, sum of loss_mask)`` of one micro-batch already on the device."""
        import torch

        set_phase("forward")
        with self._autocast():
            per_token = self.model(**batch)
        if per_token.dim() != 2 or per_token.shape != batch["input_ids"].shape:
            raise RuntimeError(
                f"the model returned a loss of shape {tuple(per_token.shape)}; the trainer needs the per-token "
                f"loss [B, L] = {tuple(batch['input_ids'].shape)} when called with labels"
            )
        mask = batch["loss_mask"].to(torch.float32)
        # where(): a non-finite loss at a masked position (padding) must not poison the sum.
        weighted = torch.where(mask != 0, per_token.float() * mask, torch.zeros_like(mask))
        return weighted.sum(), mask.sum()

    def train_step(self, micro_batches: Sequence[Mapping[str, Any]]) -> StepResult:
        import torch
        import torch.distributed as dist

        ctx = self.ctx
        dev = ctx.device
        self.model.train()
        zero_grads(self.params)
        if self.cuda_graphs is not None:
            self.cuda_graphs.before_step()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        sup = torch.zeros((), dtype=torch.float64, device=dev)
        tokens = 0
        samples = 0
        flops = 0.0
        for mb in micro_batches:
            tokens += real_tokens(mb)
            samples += batch_samples(mb)
            if self.flops_fn is not None:
                flops += float(self.flops_fn(mb))
            batch = move_batch(mb, dev)
            lsum, msum = self.forward_loss(batch)
            set_phase("backward")
            lsum.backward()
            loss_sum += lsum.detach().double()
            sup += msum.detach().double()
        stats = torch.stack([loss_sum, sup, torch.tensor(float(tokens), dtype=torch.float64, device=dev),
                             torch.tensor(flops, dtype=torch.float64, device=dev),
                             torch.tensor(float(samples), dtype=torch.float64, device=dev)])
        if ctx.dp_size > 1:
            dist.all_reduce(stats, group=ctx.dp_group)
        g_loss, g_sup, g_tok, g_flops, g_samples = (float(x) for x in stats.tolist())
        step = self.state.optimizer_steps
        lr, wd = self.lr_schedule(step), self.wd_schedule(step)

        if g_sup <= 0:
            return StepResult(g_loss, g_sup, g_tok, g_flops, float("nan"), lr, wd, True, "no supervised token",
                              g_samples)
        set_phase("gradient reduction")
        grads = optim.materialize_grads(self.params)
        optim.reduce_gradients(grads, group=ctx.dp_group, group_size=ctx.dp_size, scale=1.0 / g_sup,
                               bucket_bytes=self.settings.bucket_bytes)
        norm = optim.grad_norm_and_clip(
            self.named_params, max_norm=self.settings.clip_grad,
            tp_group=ctx.tp_group, tp_size=ctx.tp_size, tp_rank=ctx.tp_rank,
        )
        if not math.isfinite(g_loss):
            reason = "non-finite loss"
        elif not math.isfinite(norm):
            reason = "non-finite gradient"
        else:
            reason = ""
        if reason:
            for p in self.params:  # fp32 main gradients are zeroed when the next step starts
                p.grad = None
            if self.settings.fail_on_nan_grad:
                raise FloatingPointError(
                    f"iteration {self.state.iteration + 1}: {reason} (loss {g_loss}, gradient norm {norm}); "
                    "ddp.check_for_nan_in_grad is set, so the run stops (set ddp.check_for_nan_in_grad=false "
                    "to skip such updates instead)"
                )
            return StepResult(g_loss, g_sup, g_tok, g_flops, norm, lr, wd, True, reason, g_samples)
        optim.set_hyperparameters(self.optimizer, lr=lr, weight_decay=wd)
        set_phase("optimizer step")
        self.optimizer.step()
        for p in self.params:  # free the gradients before the next forward; main gradients are zeroed at its start
            p.grad = None
        self.state.optimizer_steps += 1
        return StepResult(g_loss, g_sup, g_tok, g_flops, norm, lr, wd, False, "", g_samples)

    # -- the loop --------------------------------------------------------------------------------
    def _stop_agreed(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = 1.0 if self.stop.signum is not None else 0.0
        if self.ctx.world_size > 1:
            t = torch.tensor([flag], device=self.ctx.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = float(t.item())
        return flag > 0

    def _save(self) -> None:
        if self.save_fn is None or self.last_saved_iteration == self.state.iteration:
            return
        self.save_fn(self.state)
        self.last_saved_iteration = self.state.iteration

    def _memory_gb(self) -> float | None:
        """Peak memory: allocated on the GPU, or this process's peak resident set on CPU."""
        import torch

        if self.ctx.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.ctx.device) / 1e9
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
        except (ImportError, OSError):
            return None

    def run(self, batches: Iterator[Mapping[str, Any]]) -> TrainState:
        """Train until ``train_iters`` (or a stop signal); returns the final state."""
        import torch

        s = self.settings
        st = self.state
        start_iter = st.iteration
        t_start = time.perf_counter()
        window: list[tuple[StepResult, float]] = []
        if st.iteration >= s.train_iters:
            self.print(f"nvl finetune: already at iteration {st.iteration} of train.train_iters={s.train_iters}; "
                       "nothing to do (raise train.train_iters to train further)")
            return st
        if s.exit_signal_saves:
            self.stop.install()
        import gc

        gc_was_enabled = gc.isenabled()
        if s.manual_gc_interval > 0:
            # Python's automatic collections pause ranks at different times; collect in step instead.
            gc.disable()
        try:
            while st.iteration < s.train_iters:
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(s.num_microbatches)]
                res = self.train_step(micro)
                if self.ctx.device.type == "cuda":
                    torch.cuda.synchronize(self.ctx.device)
                dt = time.perf_counter() - t0
                st.iteration += 1
                if self.cuda_graphs is not None:
                    self.cuda_graphs.after_step(st.iteration - start_iter)
                if st.iteration == start_iter + 1 and self.first_step_fn is not None:
                    self.first_step_fn()
                st.consumed_samples += int(res.samples) if res.samples else s.global_batch_size
                st.floating_point_operations_so_far += res.flops
                st.tokens_so_far += int(res.tokens)
                if res.skipped:
                    st.skipped_iterations += 1
                    self.print(f"nvl finetune: iteration {st.iteration}: update skipped ({res.reason}); "
                               f"{st.skipped_iterations} skipped so far")
                self.history.append(res)
                window.append((res, dt))
                last = st.iteration == s.train_iters
                if st.iteration % s.log_interval == 0 or last:
                    self._log(window, t_start, start_iter)
                    window = []
                if s.eval_interval and self.eval_fn is not None and (st.iteration % s.eval_interval == 0 or last):
                    self._evaluate()
                gi = s.generate_eval_interval
                if gi and self.generate_eval_fn is not None and (st.iteration % gi == 0 or last):
                    self._generate_evaluate()
                if s.manual_gc_interval > 0 and st.iteration % s.manual_gc_interval == 0:
                    gc.collect()
                stopping = self._stop_agreed()
                if s.save_interval and st.iteration % s.save_interval == 0:
                    self._save()
                if stopping:
                    name = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal on another rank"
                    self.print(f"nvl finetune: received {name}; saving a checkpoint at iteration {st.iteration} and "
                               "exiting")
                    self._save()
                    self.stopped_by = name
                    break
                if s.exit_interval and st.iteration - start_iter >= s.exit_interval and not last:
                    self.print(f"nvl finetune: train.exit_interval={s.exit_interval} reached; saving and exiting")
                    self._save()
                    break
                if s.exit_duration_s and time.perf_counter() - t_start >= s.exit_duration_s and not last:
                    self.print("nvl finetune: train.exit_duration_in_mins reached; saving and exiting")
                    self._save()
                    break
            else:
                self._save()
        finally:
            self.stop.uninstall()
            if gc_was_enabled:
                gc.enable()
        return st

    def _log(self, window: list[tuple[StepResult, float]], t_start: float, start_iter: int) -> None:
        if not window:
            return
        st = self.state
        finite = [r for r, _ in window if math.isfinite(r.loss_sum)]
        sup = sum(r.supervised_tokens for r in finite)
        loss = sum(r.loss_sum for r in finite) / sup if sup > 0 else float("nan")
        secs = sum(dt for _, dt in window)
        toks = sum(r.tokens for r, _ in window)
        flops = sum(r.flops for r, _ in window)
        last = window[-1][0]
        elapsed = time.perf_counter() - t_start
        done = st.iteration - start_iter
        eta = elapsed / done * (self.settings.train_iters - st.iteration) if done else float("nan")
        metrics: dict[str, Any] = {
            "iteration": st.iteration,
            "loss": loss,
            "lr": last.lr,
            "weight_decay": last.weight_decay,
            "grad_norm": last.grad_norm,
            "supervised_tokens": sup,
            "tokens_per_s": toks / secs if secs > 0 else 0.0,
            "tokens_per_s_per_gpu": toks / secs / self.ctx.world_size if secs > 0 else 0.0,
            "tflops_per_gpu": flops / secs / self.ctx.world_size / 1e12 if secs > 0 else 0.0,
            "step_time_s": secs / len(window),
            "consumed_samples": st.consumed_samples,
            "skipped_iterations": st.skipped_iterations,
            "eta_s": eta,
        }
        mem = self._memory_gb()
        if mem is not None:
            metrics["mem_gb"] = mem
        if self.ctx.device.type == "cuda":
            import torch

            # what the caching allocator holds (the driver's view without the CUDA context): what must fit the card
            metrics["mem_reserved_gb"] = torch.cuda.max_memory_reserved(self.ctx.device) / 1e9
        for lg in self.loggers:
            lg.log(metrics, step=st.iteration)

    def _evaluate(self) -> None:
        import gc

        assert self.eval_fn is not None
        collect = self.settings.manual_gc_interval > 0 and self.settings.manual_gc_eval
        if collect:
            gc.collect()
        loss_sum, sup = self.eval_fn()
        if collect:
            gc.collect()
        val = loss_sum / sup if sup > 0 else float("nan")
        for lg in self.loggers:
            lg.log({"iteration": self.state.iteration, "val_loss": val, "val_tokens": sup}, step=self.state.iteration)


    def _generate_evaluate(self) -> None:
        assert self.generate_eval_fn is not None
        scores = self.generate_eval_fn()
        metrics = {"iteration": self.state.iteration, **{f"val_gen_{k}": float(v) for k, v in scores.items()}}
        for lg in self.loggers:
            lg.log(metrics, step=self.state.iteration)


def evaluate(
    model: torch.nn.Module,
    batches: Iterator[Mapping[str, Any]],
    *,
    num_batches: int,
    ctx: ParallelContext,
    autocast_dtype: Any = None,
) -> tuple[float, float]:
    """Token-weighted validation loss over ``num_batches`` micro-batches per rank: ``(loss_sum, tokens)``."""
    import contextlib

    import torch
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    sup = torch.zeros((), dtype=torch.float64, device=ctx.device)
    try:
        with torch.no_grad():
            for _ in range(num_batches):
                batch = move_batch(next(batches), ctx.device)
                cm = torch.autocast(ctx.device.type,
                                    dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
                with cm:
                    per_token = model(**batch)
                mask = batch["loss_mask"].to(torch.float32)
                loss_sum += torch.where(mask != 0, per_token.float() * mask, torch.zeros_like(mask)).sum().double()
                sup += mask.sum().double()
    finally:
        model.train(was_training)
    stats = torch.stack([loss_sum, sup])
    if ctx.dp_size > 1:
        dist.all_reduce(stats, group=ctx.dp_group)
    return float(stats[0]), float(stats[1])
