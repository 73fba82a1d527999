"""Base contracts for plugin authors: what each registered kind must provide.

A model bridge subclasses the abstract base class :class:`ModelBridge` (defined in
:mod:`nvlcore.bridge`, re-exported here): the core calls its methods directly. The other kinds are
:class:`typing.Protocol` classes, so a plugin never has to inherit from the core; they document the
methods the core calls and are checked structurally (``isinstance`` works on them for the attribute
names, and the conformance tests check the signatures).

Heavy types (torch, PIL) are only named under ``TYPE_CHECKING``: importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from nvlcore.bridge import ModelBridge, first_matching_bridge
from nvlcore.data.schema import Conversation  # the one definition, re-exported for plugin authors

if TYPE_CHECKING:
    import torch

__all__ = ["Batch", "Conversation", "DatasetMaker", "Exporter", "MadeDataset", "MetricLogger", "ModelBridge",
           "PeftMethod", "Processor", "first_matching_bridge"]


Batch = dict[str, Any]
"""A collated batch: the keyword arguments of the training model's ``forward``.

Keys produced by a bridge's processor and understood by its model:

``input_ids`` ``[B, L]`` int64
    token ids, each image tile / video frame already expanded to its context tokens;
``labels`` ``[B, L]`` int64
    the next token at every position (``-100`` where nothing is predicted);
``loss_mask`` ``[B, L]`` float32
    1.0 where the loss counts (assistant tokens and the end-of-turn token), else 0.0;
``attention_mask`` ``[B, L]`` int64
    1 for real tokens, 0 for padding;
``pixel_values`` ``[T, 3, H, W]`` float32 or absent
    every image tile and video frame of the batch, in the order their context tokens appear when
    the batch is read row by row.
``seq_idx`` ``[B, L]`` int32, only in packed batches (``dataset.packing``)
    the index of each token's sample in its row, the row's padding an index of its own; the model
    must compute every sample as if alone;
``num_samples`` ``[B]`` int64, only in packed batches
    samples per row (the trainer's ``consumed_samples`` counts them).
Bridges may add keys of their own (for example per-video frame counts).
"""


@runtime_checkable
class Processor(Protocol):
    """Turns conversations into tensors for one model."""

    def __call__(self, conversation: Conversation, **options: Any) -> dict[str, Any]:
        """Process one conversation into one sample (token ids, labels, loss mask, pixels...)."""
        ...

    def collate(self, samples: Sequence[dict[str, Any]]) -> Batch:
        """Pad and stack samples into a :data:`Batch`.

        A processor whose model can train on packed rows also has ``collate_packed(rows)`` (``rows``: a
        list of lists of samples, each list concatenated into one row) returning a :data:`Batch` with
        ``seq_idx`` and ``num_samples``; ``dataset.packing`` needs it.
        """
        ...


@runtime_checkable
class DatasetMaker(Protocol):
    """Produces conversations from one data source.

    Registered as a class or a factory; ``nvl`` calls it as ``maker(split=..., **maker_kwargs)`` and
    iterates the result (the validation/test splits also get ``val_maker_kwargs``/``test_maker_kwargs``
    merged over ``maker_kwargs``).

    **The ``Kwargs`` contract.** A maker may declare its keyword arguments as an attrs class in a
    ``Kwargs`` attribute (optional, but recommended)::

        @attrs.define
        class Kwargs:
            path: str                      # no default: mandatory ('???' until set)
            max_samples: int | None = None

    :func:`nvlcore.config.load_config` then checks ``dataset.maker_kwargs`` against it when this maker
    is selected: unknown keys fail with a did-you-mean (``dataset.maker_kwargs.pth: unknown key (did
    you mean 'dataset.maker_kwargs.path'?)``), values are converted to the annotated types (``int``,
    ``float``, ``bool``, ``str``, ``list[...]``, ``dict[...]``, ``Literal[...]``, unions, ``Path``), the
    class's own validators run, and defaults are filled in so the printed config shows them. Without
    ``Kwargs`` any mapping is accepted and passed through.

    **Metrics (optional).** A ``metrics`` attribute (an object or class with ``names`` and
    ``score(prediction, reference, sample) -> {name: value}``, optionally ``aggregate(scores)`` and
    ``max_new_tokens``, or a lazy ``"module:Attr"`` string naming one) is how ``nvl eval`` and
    ``validation.generate_eval_interval`` score answers to this maker's data
    (:class:`nvlcore.eval.metrics.TaskMetrics`; without it: exact match and token F1). It is not part
    of the structural check.
    """

    #: Splits this source has, e.g. ``("train",)``.
    splits: ClassVar[tuple[str, ...]]

    def __call__(self, *, split: str = "train", **maker_kwargs: Any) -> MadeDataset:
        ...


@runtime_checkable
class MadeDataset(Protocol):
    """What a dataset maker returns: a sized, indexable collection of conversations."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Conversation: ...

    def __iter__(self) -> Iterator[Conversation]: ...


@runtime_checkable
class PeftMethod(Protocol):
    """A parameter-efficient fine-tuning method (low-rank adapters, scaling vectors, ...).

    Registered through ``nvl_register_peft_methods`` as a class (instantiated with no arguments) or an
    object. The core calls exactly these four methods:

    * ``nvl finetune`` calls :meth:`apply` after ``model.freeze_*``, then :meth:`adapter_parameters`
      to report the towers and count the adapters; the checkpoint holds every parameter left trainable
      (the adapters, and what the method leaves unfrozen), each as a logical (TP=1) tensor;
    * ``nvl eval``/``nvl generate`` with ``--adapter-checkpoint`` rebuild the run's method from its
      ``run_config.yaml``, :meth:`apply` it to the base model, load the checkpoint's fully trained
      tensors through the weight mapping and the adapter tensors (the keys :meth:`adapter_parameters`
      names) with :meth:`load_trainable_state_dict`, then :meth:`merge` when merged weights are asked for.

    Like torchtune's ``AdapterModule.adapter_params()``, the method says which parameters are its own
    (no naming convention is assumed); unlike it, the names are full model names, since nvl's methods
    attach to modules they did not build.

    **The ``Config`` contract.** The ``peft`` config section has core fields shared by adapter methods
    (:class:`nvlcore.config.PeftConfig`: ``target_modules``, ``dim``, ``alpha``, ``dropout``...). A
    method may declare an attrs class in a ``Config`` attribute (its own fields: initialisation, what it
    freezes, ...); when it is selected (``peft.method=NAME``), keys of the section beyond the core ones
    must be fields of ``Config`` (did-you-mean otherwise) and arrive, with ``Config``'s defaults, in
    ``cfg.peft.options``. ``Config`` may also declare core fields: its types and validators then check
    those values too. Without ``Config`` only the core fields are accepted.

    ``docs/examples/nvl-peft-example`` is a complete method in one file (VeRA-style).

    **Optional: how the frozen base is stored.** A method may define
    ``store_frozen_base(model, *, bridge, compute_dtype, device)``; ``nvl finetune`` calls it once after
    :meth:`apply` (weights loaded, before the optimizer and before the frozen base goes to the
    autocast dtype) so that the method can store frozen weights its own way (e.g. quantised to 4
    bits), and prints the strings of its ``storage_notes`` attribute, if any, in the line about the
    base's storage. A method whose storage quantizes the base sets a true ``quantizes_frozen_base``
    attribute: the model is then built and loaded in host memory (``model.use_cpu_initialization``'s
    default), ``store_frozen_base`` must place what it stores on ``device``, and the core moves the rest.
    Generation and merging never call it: they use the base as its checkpoint holds it.
    """

    def apply(self, model: torch.nn.Module, *, bridge: ModelBridge | None = None,
              **options: Any) -> torch.nn.Module:
        """Insert adapters and freeze what the method freezes; returns the (same) model.

        ``bridge`` (the model's bridge, when there is one) says which groups the ``freeze_*`` flags
        name (:meth:`ModelBridge.freeze`) and how each linear layer is laid out
        (:meth:`ModelBridge.linear_layouts`); ``options`` are the ``peft`` section's fields. Adapter
        parameters must be trainable; the method never unfreezes a base parameter."""
        ...

    def adapter_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The parameters :meth:`apply` added to ``model``, by full name (as ``model.named_parameters()``
        names them), this rank's local tensors. Everything else trainable is a base parameter the run
        trains fully."""
        ...

    def load_trainable_state_dict(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Copy logical (TP=1) adapter tensors, keyed as :meth:`adapter_parameters` names them, into this
        rank's parameters; returns the keys used. A missing adapter key or a wrong shape is an error
        naming it; keys that are not adapter parameters are ignored."""
        ...

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        """Fold the adapters into the base weights and remove them; returns the (same) model."""
        ...


@runtime_checkable
class Exporter(Protocol):
    """Writes a trained checkpoint in another format (``nvl export --format NAME``).

    ``options`` are the ``-O KEY=VALUE`` settings, plus ``dtype`` (``--dtype``) and ``target`` (``--target``: the
    server the export is for) when given; an exporter raises ``ValueError`` naming an option it does not take.
    """

    def export(self, *, checkpoint: Path, hf_model_path: Path, output: Path, **options: Any) -> Path:
        ...


@runtime_checkable
class MetricLogger(Protocol):
    """A sink for training metrics."""

    def log(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Record one logged iteration."""
        ...

    def close(self) -> None:
        """Flush and release resources at the end of a run."""
        ...
