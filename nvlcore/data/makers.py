"""A base class for dataset makers that read a Hugging Face dataset (Hub id or local copy).

A maker subclass says where its data lives, which rows are usable and how a row becomes a
conversation; this class does the rest the same way for every source:

* loads the split with ``datasets.load_dataset(path_or_id, name, split=..., ...)``: the Hub id by
  default, or ``path=`` a local directory laid out like the Hub repository (README.md ``configs``
  front matter and the data files), through the very same call, given the copy's resolved data
  files so that its ``datasets`` cache entry is keyed by their paths, mtimes and sizes
  (:func:`local_data_files`);
* checks the requested split against the source's splits with a clear message, and maps aliases
  (LLaVA-Video's ``train`` -> ``open_ended``);
* scans every row once without decoding images (only their headers are parsed) and keeps the
  usable ones; skipped rows are counted per reason, reported in one warning on the ``nvl.data``
  logger and kept in :attr:`HFConversationMaker.skipped`; a split with no usable row is an error,
  so a run never silently trains on nothing;
* converts rows lazily in ``__getitem__`` (decoding images then), validating each conversation
  against :mod:`nvlcore.data.schema` with the row number in any error.

``datasets`` is imported only when a maker is instantiated.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import attrs

from nvlcore.data.schema import validate_conversation

__all__ = [
    "CommonKwargs",
    "HFConversationMaker",
    "ImageSourceKwargs",
    "as_list",
    "text_of",
    "NoUsableRowsError",
    "SplitNotAvailableError",
    "image_problem",
    "local_data_files",
]

log = logging.getLogger("nvl.data")


class SplitNotAvailableError(ValueError):
    """The source has no such split."""


class NoUsableRowsError(ValueError):
    """Every row of the split was skipped (or it was empty)."""


def image_problem(value: Any, *, verify: bool = False) -> str | None:
    """Why an undecoded HF ``Image`` cell is unusable, or ``None`` when it looks fine.

    :param value: the raw cell, ``{"bytes": ..., "path": ...}`` (or ``None``).
    :param verify: decode the whole image instead of parsing only its header (slower, catches
        truncated files).
    """
    from PIL import Image, UnidentifiedImageError

    if value is None:
        return "missing image"
    if not isinstance(value, Mapping):
        return "image cell is not an image"
    data, path = value.get("bytes"), value.get("path")
    if not data and not path:
        return "missing image"
    try:
        with Image.open(io.BytesIO(data) if data else path) as im:
            if verify:
                im.load()
            elif im.size[0] <= 0 or im.size[1] <= 0:
                return "unreadable image"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return "unreadable image"
    return None


@attrs.define
class CommonKwargs:
    """Maker kwargs shared by every Hugging Face source (subclasses add theirs).

    :param path: a local copy of the dataset (a directory in the Hub repository's layout); by
        default the Hub id is loaded.
    :param revision: Hub revision (branch, tag or commit) to load.
    :param cache_dir: where ``datasets`` keeps its Arrow cache (default: its own).
    """

    path: str | None = attrs.field(default=None, kw_only=True)
    revision: str | None = attrs.field(default=None, kw_only=True)
    cache_dir: str | None = attrs.field(default=None, kw_only=True)


@attrs.define
class ImageSourceKwargs(CommonKwargs):
    """:class:`CommonKwargs` plus the option of sources with images.

    :param verify_images: fully decode every image while scanning (slower; by default only image
        headers are checked and a truncated image surfaces when its example is read).
    """

    verify_images: bool = attrs.field(default=False, kw_only=True)


class HFConversationMaker:
    """Base of Hugging Face dataset makers; an instance is the made dataset (``MadeDataset``).

    Subclasses set :attr:`name`, :attr:`hub_id`, :attr:`splits`, :attr:`Kwargs` (an attrs class
    deriving from :class:`CommonKwargs`) and implement :meth:`row_problem` and :meth:`convert`;
    they may override :meth:`load` (several subsets) and :attr:`split_aliases`.

    :param split: the split to make.
    :param maker_kwargs: fields of :attr:`Kwargs`.
    """

    #: Registry name (used in messages).
    name: ClassVar[str] = ""
    #: The source's Hub dataset id.
    hub_id: ClassVar[str] = ""
    #: Splits users may ask for.
    splits: ClassVar[tuple[str, ...]] = ("train",)
    #: User split name -> the source's split name.
    split_aliases: ClassVar[Mapping[str, str]] = {}
    #: Extra advice when a split is missing.
    split_hint: ClassVar[str] = ""
    #: The maker_kwargs schema.
    Kwargs: ClassVar[type] = CommonKwargs
    #: Columns read by :meth:`row_problem` (all columns when empty).
    scan_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, split: str = "train", **maker_kwargs: Any) -> None:
        if split not in self.splits:
            only = "only the split" if len(self.splits) == 1 else "the splits"
            raise SplitNotAvailableError(
                f"{self.name}: {self.source_name()} has {only} {', '.join(repr(s) for s in self.splits)}; "
                f"got split {split!r}.{' ' + self.split_hint if self.split_hint else ''}"
            )
        self.kwargs = self.make_kwargs(maker_kwargs)
        self.split = split
        self.source_split = self.split_aliases.get(split, split)
        self.label = f"{self.name}/{split}"
        self.dataset = self.load()
        self.indices, self.skipped = self._scan()
        self.num_rows = len(self.dataset)
        self.num_skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        if self.num_skipped:
            log.warning("%s: skipped %d of %d rows (%s)", self.label, self.num_skipped, self.num_rows, reasons)
        if not self.indices:
            raise NoUsableRowsError(
                f"{self.label}: no usable rows in {self.where_from()}"
                + (f": all {self.num_rows} rows were skipped ({reasons})" if self.num_rows else ": the split is empty")
                + "; check the dataset path, subset and split"
            )

    # -- hooks for subclasses --------------------------------------------------------------------
    @classmethod
    def make_kwargs(cls, maker_kwargs: Mapping[str, Any]) -> Any:
        """Build :attr:`Kwargs`, turning attrs' errors into messages that name the maker."""
        names = [f.name for f in attrs.fields(cls.Kwargs)]
        unknown = sorted(set(maker_kwargs) - set(names))
        if unknown:
            raise TypeError(
                f"{cls.name}: unknown dataset.maker_kwargs {', '.join(unknown)}; valid: {', '.join(names)}"
            )
        try:
            return cls.Kwargs(**maker_kwargs)
        except TypeError as exc:
            raise TypeError(f"{cls.name}: dataset.maker_kwargs: {exc}") from exc

    def source_name(self) -> str:
        return self.hub_id

    def where_from(self) -> str:
        src = self.kwargs.path or self.hub_id
        return f"{src} (split {self.source_split!r})"

    def load_split(self, name: str | None) -> Any:
        """``datasets.load_dataset(path or hub_id, name, split=...)``: the one loading code path."""
        import datasets

        source = self.kwargs.path or self.hub_id
        options: dict[str, Any] = {"revision": self.kwargs.revision, "cache_dir": self.kwargs.cache_dir}
        if self.kwargs.path is not None:
            from pathlib import Path

            if not Path(self.kwargs.path).exists():
                raise FileNotFoundError(f"{self.name}: dataset.maker_kwargs.path {self.kwargs.path!r} does not exist")
        try:
            if self.kwargs.path is not None:
                options["data_files"] = local_data_files(source, name, cache_dir=self.kwargs.cache_dir)
            return datasets.load_dataset(source, name, split=self.source_split, **options)
        except ValueError as exc:
            raise ValueError(f"{self.name}: cannot load {source!r} (config {name!r}, split {self.source_split!r}): "
                             f"{exc}") from exc

    def load(self) -> Any:
        """The split as a ``datasets.Dataset`` (override for sources with several subsets)."""
        return self.load_split(None)

    def row_problem(self, row: Mapping[str, Any]) -> str | None:
        """Why ``row`` (image cells undecoded) is unusable, or ``None``. Reasons are counted by text."""
        raise NotImplementedError

    def convert(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The conversation for a usable ``row`` (images decoded)."""
        raise NotImplementedError

    # -- machinery ---------------------------------------------------------------------------------
    def _scan(self) -> tuple[list[int], Counter[str]]:
        ds = self.dataset
        columns = [c for c in self.scan_columns if c in ds.column_names] if self.scan_columns else ds.column_names
        missing = [c for c in self.scan_columns if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"{self.label}: {self.where_from()} has no column(s) {', '.join(missing)} "
                f"(columns: {', '.join(ds.column_names)}); is this the right dataset?"
            )
        from nvlcore.progress import Progress

        raw = ds.select_columns(columns).with_format("arrow")
        keep: list[int] = []
        skipped: Counter[str] = Counter()
        index = 0
        with Progress(len(ds), f"{self.label}: checking rows", unit="row") as bar:
            for table in raw.iter(batch_size=512):
                bar.update(table.num_rows)
                for row in table.to_pylist():
                    problem = self.row_problem(row)
                    if problem is None:
                        keep.append(index)
                    else:
                        skipped[problem] += 1
                    index += 1
        return keep, skipped

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self.indices) <= index < len(self.indices):
            raise IndexError(f"{self.label}: index {index} out of range (0..{len(self.indices) - 1})")
        row_index = self.indices[index]
        where = f"row {row_index} of {self.label}"
        try:
            conversation = self.convert(self.dataset[row_index])
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        return validate_conversation(conversation, where=where)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def row_index(self, index: int) -> int:
        """The source row behind example ``index`` (rows are skipped, so they can differ)."""
        return self.indices[index]


def local_data_files(path: str, name: str | None, *, cache_dir: str | None = None) -> Any:
    """The data files of config ``name`` of the local dataset directory ``path``, each identified by
    its resolved path, modification time and size, for ``load_dataset(path, name, data_files=...)``.

    Without them ``datasets`` caches a local directory under its folder *name* and the config's file
    *patterns*: two copies named alike (``a/the_cauldron``, ``b/the_cauldron``) share one cache
    entry, and so does a copy rewritten in place, so the first rows prepared are served silently.
    Given explicitly, the data files go into the cache's config id (``datasets`` hashes a
    ``DataFilesList`` with its ``origin_metadata``, the mtime of local files); the size is added
    to that metadata so that a rewrite keeping the mtime is seen too.
    """
    import os

    import datasets
    from datasets.data_files import DataFilesDict, DataFilesList

    resolved = datasets.load_dataset_builder(path, name, cache_dir=cache_dir).config.data_files
    return DataFilesDict({
        split: DataFilesList(
            list(files),
            [(*meta, f"size={os.stat(f).st_size}") if os.path.isfile(f) else meta
             for f, meta in zip(files, files.origin_metadata, strict=True)],
        )
        for split, files in resolved.items()
    })


def text_of(value: Any) -> str | None:
    """``value`` stripped if it is a non-empty string, else ``None``."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def as_list(value: str | Sequence[str]) -> list[str]:
    """A string or a list of strings as a list."""
    return [value] if isinstance(value, str) else list(value)
