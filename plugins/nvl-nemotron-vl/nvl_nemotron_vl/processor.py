"""The Nemotron Nano V2 VL processor: conversations (the nvl schema) -> model inputs.

One conversation becomes one sample: the chat template rendered as text, every image cut into
tiles (``<img>`` + ``<image>`` x 256 per tile + ``</img>``), every video decoded into frames (one
tile each, ``Frame i sampled at t seconds: <img>`` + ``<video>`` x 256 + ``</img>``), tokenized
without BOS, with next-token labels and a loss mask that covers assistant tokens and their
end-of-turn token only. :meth:`NemotronVLProcessor.collate` pads samples into a
:data:`nvlcore.contracts.Batch`. ``docs/processor.md`` explains every decision; the important ones:

* The loss mask comes from the rendered structure: the text is assembled from parts that are
  known to be supervised or not, tokenized as one string (so token boundaries are those of
  inference) and each token is supervised when its first character lies in a supervised part.
  No string search over token ids.
* Training turns render ``<SPECIAL_11>Assistant\\n<think></think>`` (``think_block="empty"``,
  the default) so that training matches the reasoning-off generation prompt; the inserted
  ``<think></think>`` is never supervised. An answer that already contains ``</think>`` (a
  reasoning trace) is rendered as it is and fully supervised.
* Truncation to ``seq_length`` never splits an image or a video (error), never silently drops all
  supervised tokens (error), and a sample with no supervised token is an error.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nvl_nemotron_vl.image_processing import CLIP_MEAN, CLIP_STD

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "ASSISTANT_HEADER",
    "END_OF_TURN",
    "SYSTEM_HEADER",
    "USER_HEADER",
    "NemotronVLProcessor",
    "ProcessorConfig",
    "SampleError",
]

log = logging.getLogger("nvl.data")

# The chat template's control strings (reference model-format.md §5, toy_tokenizer.CHAT_TEMPLATE).
SYSTEM_HEADER = "<SPECIAL_10>System\n"
USER_HEADER = "<SPECIAL_11>User\n"
ASSISTANT_HEADER = "<SPECIAL_11>Assistant\n"
END_OF_TURN = "<SPECIAL_12>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
EMPTY_THINK = THINK_OPEN + THINK_CLOSE

# Stand-ins for media while the template's strip() and flag removal run over a user turn; they
# are private-use code points, and user text that contains them is refused.
_IMAGE_PH = "\ue000"
_VIDEO_PH = "\ue001"

IGNORE_INDEX = -100


class SampleError(ValueError):
    """A conversation cannot become a training sample; the message says where and why."""


def _positive(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"processor option {attr.name} must be positive, got {value}")


@attrs.frozen
class ProcessorConfig:
    """Everything the processor needs besides the tokenizer. Field names are the option names.

    :param image_size: tile side in pixels (``config.json`` ``force_image_size``).
    :param patch_size: ViT patch size; with ``downsample_ratio`` it sets :attr:`num_image_token`.
    :param downsample_ratio: pixel-shuffle ratio.
    :param max_num_tiles: most tiles per image, thumbnail not counted.
    :param min_num_tiles: fewest tiles per image.
    :param use_thumbnail: append a whole-image tile when an image has more than one tile.
    :param norm_mean: per-channel mean for normalisation (OpenAI CLIP).
    :param norm_std: per-channel std for normalisation.
    :param img_start_token: opens an image tile block.
    :param img_end_token: closes it.
    :param img_context_token: one per image-tile embedding (``<image>``).
    :param video_context_token: one per video-frame embedding (``<video>``).
    :param video_num_frames: frames sampled uniformly from a video when ``video_fps`` is unset.
    :param video_fps: sample this many frames per second of video instead (``None``: fixed count).
    :param video_max_frames: cap on the frame count in ``video_fps`` mode (``None``: no cap).
    :param video_prefix: text before a video's frames.
    :param frame_prefix: text before each frame, formatted with ``index`` (1-based) and ``seconds``.
    :param frame_suffix: text after each frame's ``</img>``.
    :param video_decode_threads: decord threads per video (1 suits DataLoader workers).
    :param system_prompt: system text used when a conversation has no system turn (``None``: empty).
    :param think_block: ``"empty"``: training turns open with an unsupervised ``<think></think>``
        (like the reasoning-off generation prompt); ``"none"``: they open with the bare header, as
        the template renders earlier turns.
    :param seq_length: longest sample in tokens (``None``: no limit).
    :param pad_to_multiple_of: :meth:`NemotronVLProcessor.collate` pads the batch length up to
        a multiple of this (capped at ``seq_length``); 1 disables rounding.
    :param pad_to_max_length: pad every batch to ``seq_length`` instead (fixed shapes).
    """

    image_size: int = attrs.field(default=512, validator=_positive)
    patch_size: int = attrs.field(default=16, validator=_positive)
    downsample_ratio: float = attrs.field(default=0.5, validator=_positive)
    max_num_tiles: int = attrs.field(default=12, validator=_positive)
    min_num_tiles: int = attrs.field(default=1, validator=_positive)
    use_thumbnail: bool = True
    norm_mean: tuple[float, float, float] = attrs.field(default=CLIP_MEAN, converter=tuple)
    norm_std: tuple[float, float, float] = attrs.field(default=CLIP_STD, converter=tuple)
    img_start_token: str = "<img>"
    img_end_token: str = "</img>"
    img_context_token: str = "<image>"
    video_context_token: str = "<video>"
    video_num_frames: int = attrs.field(default=10, validator=_positive)
    video_fps: float | None = attrs.field(default=None, validator=_positive)
    video_max_frames: int | None = attrs.field(default=None, validator=_positive)
    video_prefix: str = "This is a video:\n"
    frame_prefix: str = "Frame {index} sampled at {seconds:.2f} seconds: "
    frame_suffix: str = "\n"
    video_decode_threads: int = attrs.field(default=1, validator=_positive)
    system_prompt: str | None = None
    think_block: str = attrs.field(default="empty", validator=attrs.validators.in_(("empty", "none")))
    seq_length: int | None = attrs.field(default=None, validator=_positive)
    pad_to_multiple_of: int = attrs.field(default=128, validator=_positive)
    pad_to_max_length: bool = False

    def __attrs_post_init__(self) -> None:
        if self.pad_to_max_length and self.seq_length is None:
            raise ValueError("pad_to_max_length needs seq_length")
        if self.min_num_tiles > self.max_num_tiles:
            raise ValueError(f"min_num_tiles ({self.min_num_tiles}) > max_num_tiles ({self.max_num_tiles})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if len(self.norm_mean) != 3 or len(self.norm_std) != 3:
            raise ValueError("norm_mean and norm_std need 3 values (R, G, B)")
        try:
            self.frame_prefix.format(index=1, seconds=0.0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"frame_prefix {self.frame_prefix!r} must format with index= and seconds= only: {exc}"
            ) from exc
        n = (self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2
        if n != int(n) or n < 1:
            raise ValueError(
                f"(image_size/patch_size)^2 * downsample_ratio^2 = {n} is not a positive whole number of tokens"
            )

    @property
    def num_image_token(self) -> int:
        """Context tokens per tile: ``(image_size / patch_size)^2 * downsample_ratio^2`` (256 for 512/16/0.5)."""
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)


_OPTION_NAMES = tuple(f.name for f in attrs.fields(ProcessorConfig))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


@attrs.define
class _Media:
    kind: str  # "image" | "video"
    where: str  # field path for error messages
    tiles: list[Image.Image]
    timestamps: list[float] = attrs.field(factory=list)


class NemotronVLProcessor:
    """Conversations -> samples -> batches for ``NemotronH_Nano_VL_V2`` models.

    Build it with :meth:`from_hf_dir`. It is picklable (DataLoader workers): the tokenizer is
    reloaded from ``tokenizer_dir`` in each process instead of being pickled.

    :param tokenizer_dir: directory with the HF tokenizer files.
    :param config: the processor options.
    """

    def __init__(self, tokenizer_dir: str | os.PathLike[str], config: ProcessorConfig | None = None) -> None:
        self.tokenizer_dir = Path(tokenizer_dir)
        self.config = config or ProcessorConfig()
        self._tokenizer: Any = None
        tok = self.tokenizer
        self.token_ids: dict[str, int] = {}
        for field in ("img_start_token", "img_end_token", "img_context_token", "video_context_token"):
            token = getattr(self.config, field)
            ids = tok(token, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(
                    f"{self.tokenizer_dir}: {field} {token!r} is not a single token of this tokenizer "
                    f"(it splits into {len(ids)}); is this the Nemotron VL tokenizer?"
                )
            self.token_ids[token] = ids[0]
        for token in (END_OF_TURN, "<SPECIAL_10>", "<SPECIAL_11>"):
            ids = tok(token, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"{self.tokenizer_dir}: control token {token!r} is not a single token")
            self.token_ids[token] = ids[0]
        self.pad_token_id: int = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_token_id is None:
            raise ValueError(f"{self.tokenizer_dir}: the tokenizer has neither a pad nor an eos token")
        c = self.config
        self.img_start_id = self.token_ids[c.img_start_token]
        self.img_end_id = self.token_ids[c.img_end_token]
        self.img_context_id = self.token_ids[c.img_context_token]
        self.video_context_id = self.token_ids[c.video_context_token]
        self.eos_id = self.token_ids[END_OF_TURN]
        self._reserved = (
            c.img_start_token, c.img_end_token, c.img_context_token, c.video_context_token,
            "<SPECIAL_10>", "<SPECIAL_11>", END_OF_TURN, _IMAGE_PH, _VIDEO_PH,
        )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str], **options: Any) -> NemotronVLProcessor:
        """Read ``config.json``, ``preprocessor_config.json`` (if present) and the tokenizer of an HF dir.

        Values come from the files (as data; no remote code runs); ``options`` (any
        :class:`ProcessorConfig` field) override them.

        :raises FileNotFoundError: when ``config.json`` is missing.
        :raises ValueError: when the files disagree with each other or with the tokenizer.
        :raises TypeError: for an unknown option, listing the valid ones.
        """
        root = Path(path)
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown processor option(s) {', '.join(unknown)}; valid: {', '.join(_OPTION_NAMES)}")
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{root}: no config.json; is this an HF model directory?")
        cfg = _read_json(cfg_path)
        values: dict[str, Any] = {}
        vision = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else {}
        if "force_image_size" in cfg:
            values["image_size"] = int(cfg["force_image_size"])
        if "patch_size" in cfg or "patch_size" in vision:
            values["patch_size"] = int(cfg.get("patch_size", vision.get("patch_size")))
        if "downsample_ratio" in cfg:
            values["downsample_ratio"] = float(cfg["downsample_ratio"])
        for key in ("img_start_token", "img_end_token", "img_context_token", "video_context_token",
                    "use_thumbnail", "max_num_tiles", "norm_mean", "norm_std"):
            if key in cfg:
                values[key] = cfg[key]
        pre_path = root / "preprocessor_config.json"
        if pre_path.is_file():
            pre = _read_json(pre_path)
            for src, dst in (("image_size", "image_size"), ("patch_size", "patch_size"),
                             ("downsample_ratio", "downsample_ratio")):
                if src in pre and dst in values and pre[src] != values[dst]:
                    raise ValueError(
                        f"{pre_path}: {src}={pre[src]} disagrees with {cfg_path.name} ({dst}={values[dst]})"
                    )
                if src in pre:
                    values[dst] = pre[src]
            for key in ("max_num_tiles", "min_num_tiles", "use_thumbnail", "norm_mean", "norm_std"):
                if key in pre:
                    values[key] = pre[key]
        values.update(options)
        processor = cls(root, ProcessorConfig(**values))
        for field, token in (("img_context_token_id", processor.config.img_context_token),
                             ("video_context_token_id", processor.config.video_context_token)):
            if cfg.get(field) is not None and int(cfg[field]) != processor.token_ids[token]:
                raise ValueError(
                    f"{cfg_path}: {field}={cfg[field]} but the tokenizer in {root} gives {token!r} id "
                    f"{processor.token_ids[token]}; the tokenizer does not belong to this model"
                )
        return processor

    def with_options(self, **options: Any) -> NemotronVLProcessor:
        """A copy with some options changed (the tokenizer is shared)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.config = attrs.evolve(self.config, **options)
        return new

    @property
    def tokenizer(self) -> Any:
        """The HF tokenizer (loaded on first use in each process)."""
        if self._tokenizer is None:
            # Never remote code: the model's config.json has an ``auto_map``, and a plain
            # ``AutoTokenizer.from_pretrained`` would ask on stdin whether to run it. The
            # tokenizer itself is a plain fast tokenizer (tokenizer.json).
            if (self.tokenizer_dir / "tokenizer.json").is_file():
                from transformers import PreTrainedTokenizerFast

                self._tokenizer = PreTrainedTokenizerFast.from_pretrained(self.tokenizer_dir)
            else:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, trust_remote_code=False)
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def num_image_token(self) -> int:
        """Context tokens per tile or frame."""
        return self.config.num_image_token

    # -- rendering ----------------------------------------------------------------------------
    def _check_text(self, text: str, field: str, where: str) -> None:
        for token in self._reserved:
            if token in text:
                shown = {_IMAGE_PH: "U+E000", _VIDEO_PH: "U+E001"}.get(token, token)
                raise SampleError(
                    f"{where}: {field}: text contains the reserved token string {shown!r}; images and videos "
                    "belong in image/video content items, and control tokens are added by the template"
                )

    def _render_content(self, turn: Mapping[str, Any], t: int, where: str,
                        media: list[tuple[str, Mapping[str, Any], str]]) -> str:
        from nvlcore.data.schema import iter_items

        out = []
        for i, item in enumerate(iter_items(turn)):
            field = f"conversation[{t}].content[{i}]"
            if item["type"] == "text":
                self._check_text(item["text"], f"{field}.text", where)
                out.append(item["text"])
            elif item["type"] == "image":
                media.append(("image", item, field))
                out.append(_IMAGE_PH)
            else:
                media.append(("video", item, field))
                out.append(_VIDEO_PH)
        return "".join(out)

    @staticmethod
    def _thinking_flag(text: str, current: bool) -> bool:
        on, off = text.rfind("/think"), text.rfind("/no_think")
        if on > off:
            return True
        if off > on:
            return False
        return current

    @staticmethod
    def _strip_flags(text: str) -> str:
        return text.replace("/no_think", "").replace("/think", "").strip()

    def _render(
        self, conversation: Mapping[str, Any], where: str, add_generation_prompt: bool
    ) -> tuple[list[tuple[str, bool]], list[tuple[str, Mapping[str, Any], str]], list[str]]:
        """The conversation as (text, supervised) parts with media placeholders, the media, the targets."""
        turns = list(conversation["conversation"])
        media: list[tuple[str, Mapping[str, Any], str]] = []
        targets: list[str] = []
        thinking = True
        if turns and turns[0]["role"] == "system":
            system_raw = self._render_content(turns[0], 0, where, media)
            body = turns[1:]
            offset = 1
        else:
            system_raw = self.config.system_prompt or ""
            self._check_text(system_raw, "system_prompt", where)
            body = turns
            offset = 0
        thinking = self._thinking_flag(system_raw, thinking)
        parts: list[tuple[str, bool]] = [(SYSTEM_HEADER + self._strip_flags(system_raw) + "\n", False)]
        for t, turn in enumerate(body, start=offset):
            text = self._render_content(turn, t, where, media)
            if turn["role"] == "user":
                thinking = self._thinking_flag(text, thinking)
                parts.append((USER_HEADER + self._strip_flags(text) + "\n", False))
                continue
            # assistant
            if add_generation_prompt:
                # History turns exactly as the chat template renders them (reasoning dropped).
                shown = text.split(THINK_CLOSE)[-1] if THINK_CLOSE in text else text
                parts.append((ASSISTANT_HEADER + shown.strip() + "\n" + END_OF_TURN + "\n", False))
                continue
            answer = text.strip()
            if not answer or answer == EMPTY_THINK:
                raise SampleError(
                    f"{where}: conversation[{t}]: the assistant turn has no text; nothing to learn from it"
                )
            header = ASSISTANT_HEADER
            if self.config.think_block == "empty" and THINK_CLOSE not in answer:
                header += EMPTY_THINK
            parts.append((header, False))
            parts.append((answer + "\n" + END_OF_TURN, True))
            parts.append(("\n", False))
            targets.append(answer)
        if add_generation_prompt:
            parts.append((ASSISTANT_HEADER + (THINK_OPEN + "\n" if thinking else EMPTY_THINK), False))
        return parts, media, targets

    # -- media --------------------------------------------------------------------------------
    def _load_image(self, item: Mapping[str, Any], field: str, where: str) -> list[Image.Image]:
        from PIL import Image

        from nvl_nemotron_vl.image_processing import dynamic_tiles

        image = item["image"]
        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as fh:
                    image = fh.convert("RGB")
            except (OSError, ValueError) as exc:
                raise SampleError(f"{where}: {field}.image: cannot open image file {image}: {exc}") from exc
        c = self.config
        try:
            return dynamic_tiles(image, image_size=c.image_size, max_num_tiles=c.max_num_tiles,
                                 use_thumbnail=c.use_thumbnail, min_num_tiles=c.min_num_tiles)
        except (OSError, ValueError) as exc:
            raise SampleError(f"{where}: {field}.image: cannot read the image: {exc}") from exc

    def _load_video(self, item: Mapping[str, Any], field: str, where: str) -> tuple[list[Image.Image], list[float]]:
        from nvl_nemotron_vl.video import VideoDecodeError, decode_video_frames, resize_frames

        c = self.config
        if "path" in item:
            try:
                frames, stamps = decode_video_frames(
                    item["path"], num_frames=c.video_num_frames, fps=c.video_fps,
                    max_frames=c.video_max_frames, num_threads=c.video_decode_threads,
                )
            except (VideoDecodeError, ValueError) as exc:
                raise SampleError(f"{where}: {field}.path: {exc}") from exc
        else:
            frames = list(item["video"])
            fps = float(item.get("fps", 1.0))
            stamps = [float(s) for s in item["timestamps"]] if item.get("timestamps") is not None else [
                i / fps for i in range(len(frames))
            ]
        return resize_frames(frames, c.image_size), stamps

    # -- the sample ---------------------------------------------------------------------------
    def __call__(
        self, conversation: Mapping[str, Any], *, where: str = "example", add_generation_prompt: bool = False
    ) -> dict[str, Any]:
        """Process one conversation into one sample.

        :param conversation: ``{"conversation": [...]}`` in the nvl schema.
        :param where: names the example in error messages (e.g. ``"row 17 of make_raven_dataset/train"``).
        :param add_generation_prompt: build an inference prompt instead: history rendered as the
            chat template does, then the assistant header with the think block that the
            ``/think``/``/no_think`` flags select; nothing is supervised.
        :returns: a dict with ``input_ids``, ``labels`` (int64 ``[n]``), ``loss_mask`` (float32
            ``[n]``), ``pixel_values`` (float32 ``[tiles, 3, S, S]`` or ``None``), ``num_tiles``
            (tiles per image), ``num_frames`` (frames per video), ``frame_timestamps``,
            ``media_kinds`` (``"image"``/``"video"`` per media item, in order),
            ``num_supervised_tokens`` and ``truncated_from`` (the length before truncation, or ``None``).
        :raises SampleError: naming ``where`` for anything that cannot be trained on.
        """
        import torch

        from nvl_nemotron_vl.image_processing import normalize_tiles
        from nvlcore.data.schema import validate_conversation

        validate_conversation(conversation, where=where)
        c = self.config
        parts, media_refs, _ = self._render(conversation, where, add_generation_prompt)

        media: list[_Media] = []
        for kind, item, field in media_refs:
            if kind == "image":
                media.append(_Media("image", field, self._load_image(item, field, where)))
            else:
                frames, stamps = self._load_video(item, field, where)
                media.append(_Media("video", field, frames, stamps))

        # Expand placeholders into marker text: one context token per image / per frame, expanded
        # to its full count after tokenization (cheaper than tokenizing thousands of markers).
        image_marker = c.img_start_token + c.img_context_token + c.img_end_token
        frame_marker = c.img_start_token + c.video_context_token + c.img_end_token
        media_iter = iter(media)
        texts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for text, supervised in parts:
            if _IMAGE_PH in text or _VIDEO_PH in text:
                pieces = []
                for ch in text:
                    if ch == _IMAGE_PH:
                        next(media_iter)
                        pieces.append(image_marker)
                    elif ch == _VIDEO_PH:
                        m = next(media_iter)
                        pieces.append(c.video_prefix + "".join(
                            c.frame_prefix.format(index=k + 1, seconds=s) + frame_marker + c.frame_suffix
                            for k, s in enumerate(m.timestamps)
                        ))
                    else:
                        pieces.append(ch)
                text = "".join(pieces)
            if supervised:
                spans.append((pos, pos + len(text)))
            texts.append(text)
            pos += len(text)
        full = "".join(texts)

        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        starts = [s for s, _ in spans]
        sup = torch.tensor(
            [bool(spans) and (k := bisect.bisect_right(starts, a) - 1) >= 0 and a < spans[k][1]
             for a, _ in enc["offset_mapping"]],
            dtype=torch.bool,
        )

        # Expand each context token to its tiles x num_image_token copies.
        n_tok = c.num_image_token
        is_img = ids == self.img_context_id
        is_vid = ids == self.video_context_id
        n_images = sum(m.kind == "image" for m in media)
        n_frames = sum(len(m.tiles) for m in media if m.kind == "video")
        if int(is_img.sum()) != n_images or int(is_vid.sum()) != n_frames:
            raise SampleError(
                f"{where}: tokenization produced {int(is_img.sum())} image and {int(is_vid.sum())} frame markers "
                f"for {n_images} images and {n_frames} frames; the tokenizer does not keep "
                f"{c.img_context_token!r}/{c.video_context_token!r} whole"
            )
        repeats = torch.ones_like(ids)
        image_tiles = iter([len(m.tiles) for m in media if m.kind == "image"])
        for p in torch.nonzero(is_img).flatten().tolist():
            repeats[p] = next(image_tiles) * n_tok
        repeats[is_vid] = n_tok
        input_ids = ids.repeat_interleave(repeats)
        supervised = sup.repeat_interleave(repeats)

        # Token span of every media item: [<img> of its first tile/frame, </img> of its last].
        ends = torch.cumsum(repeats, 0)
        ctx_positions = torch.nonzero(is_img | is_vid).flatten().tolist()
        blocks: list[tuple[int, int]] = []
        cursor = 0
        for m in media:
            count = 1 if m.kind == "image" else len(m.tiles)
            first, last = ctx_positions[cursor], ctx_positions[cursor + count - 1]
            cursor += count
            start = int(ends[first] - repeats[first]) - 1  # the <img> before the context run
            blocks.append((start, int(ends[last]) + 1))  # one past the </img>

        total = int(input_ids.numel())
        truncated_from = None
        if c.seq_length is not None and total > c.seq_length and add_generation_prompt:
            raise SampleError(
                f"{where}: the prompt has {total} tokens, more than seq_length={c.seq_length}; cutting it would "
                "remove the question; shorten the conversation or use fewer tiles / frames"
            )
        if c.seq_length is not None and total > c.seq_length:
            cut = c.seq_length
            for m, (b0, b1) in zip(media, blocks, strict=True):
                if b0 < cut < b1:
                    raise SampleError(
                        f"{where}: {m.where}: truncating the sample from {total} "
                        f"to seq_length={cut} tokens would cut through this {m.kind} (tokens {b0}..{b1 - 1}); "
                        "raise dataset.seq_length (and model.seq_length), lower max_num_tiles / video_num_frames, "
                        "or drop the example"
                    )
            kept = supervised[1:cut].sum().item()  # labels at positions < cut predict tokens 1..cut-1
            if kept == 0:
                raise SampleError(
                    f"{where}: truncating the sample from {total} to seq_length={cut} tokens would leave none of its "
                    f"{int(supervised.sum())} supervised tokens; raise dataset.seq_length (and model.seq_length) "
                    "or shorten the prompt (fewer tiles or frames)"
                )
            log.warning("%s: truncated from %d to %d tokens (seq_length); %d of %d supervised tokens kept",
                        where, total, cut, kept, int(supervised.sum()))
            keep_media = [b1 <= cut for _, b1 in blocks]
            media = [m for m, k in zip(media, keep_media, strict=True) if k]
            input_ids, supervised = input_ids[:cut], supervised[:cut]
            truncated_from = total

        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:-1] = input_ids[1:]
        loss_mask = torch.zeros(input_ids.shape, dtype=torch.float32)
        loss_mask[:-1] = supervised[1:].to(torch.float32)
        n_sup = int(loss_mask.sum())
        if not add_generation_prompt and n_sup == 0:
            raise SampleError(f"{where}: the sample has no supervised token (no assistant answer); it cannot be "
                              "trained on")

        tiles = [t for m in media for t in m.tiles]
        pixel_values = normalize_tiles(tiles, c.norm_mean, c.norm_std) if tiles else None
        return {
            "input_ids": input_ids,
            "labels": labels,
            "loss_mask": loss_mask,
            "pixel_values": pixel_values,
            "num_tiles": [len(m.tiles) for m in media if m.kind == "image"],
            "num_frames": [len(m.tiles) for m in media if m.kind == "video"],
            "frame_timestamps": [m.timestamps for m in media if m.kind == "video"],
            "media_kinds": [m.kind for m in media],
            "num_supervised_tokens": n_sup,
            "truncated_from": truncated_from,
        }

    # -- batching -----------------------------------------------------------------------------
    def collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Right-pad samples into a batch (:data:`nvlcore.contracts.Batch`).

        The length is the longest sample rounded up to ``pad_to_multiple_of``, capped at
        ``seq_length`` (or ``seq_length`` itself with ``pad_to_max_length``). Keys: ``input_ids``, ``labels`` (``-100``
        on padding and on each row's last token), ``loss_mask``, ``attention_mask``, ``pixel_values`` (all tiles and
        frames of the batch in the order of their context tokens, row by row; absent when there are none),
        ``num_image_tiles`` (int64 ``[images]``: tiles per image, same order), ``num_frames`` (int64 ``[videos]``:
        frames per video, same order; the model groups ``<video>`` blocks by it for Efficient Video Sampling).
        """
        import torch

        if not samples:
            raise ValueError("collate got an empty list of samples")
        c = self.config
        longest = max(int(s["input_ids"].numel()) for s in samples)
        length = math.ceil(longest / c.pad_to_multiple_of) * c.pad_to_multiple_of
        if c.seq_length is not None:
            length = max(c.seq_length if c.pad_to_max_length else min(length, c.seq_length), longest)
        b = len(samples)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        loss_mask = torch.zeros((b, length), dtype=torch.float32)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        for r, s in enumerate(samples):
            n = int(s["input_ids"].numel())
            input_ids[r, :n] = s["input_ids"]
            labels[r, :n] = s["labels"]
            loss_mask[r, :n] = s["loss_mask"]
            attention_mask[r, :n] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "loss_mask": loss_mask,
            "attention_mask": attention_mask,
            "num_image_tiles": torch.tensor([n for s in samples for n in s["num_tiles"]], dtype=torch.long),
            "num_frames": torch.tensor([n for s in samples for n in s["num_frames"]], dtype=torch.long),
        }
        pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        return batch

    def collate_packed(self, rows: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
        """Pack samples into rows: ``rows[r]`` is the list of samples concatenated into row ``r``
        (``dataset.packing``), each sample whole; rows are then right-padded as in :meth:`collate`.

        Keys: those of :meth:`collate` (each sample's ``labels`` end at its own last token, so no label
        crosses into the next sample; ``pixel_values`` in reading order, so every tile lands in its
        own sample's positions), plus ``seq_idx`` (int32 ``[B, L]``: the index of each token's sample
        in its row; the padding of row ``r`` gets ``len(rows[r])``, an index of its own),
        ``num_samples`` (int64 ``[B]``), ``cu_seqlens`` (a tuple of ``n + 1`` ints: the start of each of
        the ``n`` samples and padding runs over the ``B * L`` tokens read as one row, then ``B * L``) and
        ``max_seqlen`` (int: the longest of them). The model resets its Mamba states and keeps attention within
        each index, so every sample is computed exactly as alone.

        :raises ValueError: for an empty row, or a row longer than ``seq_length``.
        """
        import torch

        if not rows or any(not row for row in rows):
            raise ValueError("collate_packed needs at least one sample in every row")
        c = self.config
        joined = []
        for r, row in enumerate(rows):
            n = sum(int(s["input_ids"].numel()) for s in row)
            if c.seq_length is not None and n > c.seq_length:
                raise ValueError(f"packed row {r} holds {n} tokens, more than dataset.seq_length={c.seq_length}")
            joined.append({
                "input_ids": torch.cat([s["input_ids"] for s in row]),
                "labels": torch.cat([s["labels"] for s in row]),
                "loss_mask": torch.cat([s["loss_mask"] for s in row]),
                "pixel_values": (torch.cat([s["pixel_values"] for s in row if s.get("pixel_values") is not None])
                                 if any(s.get("pixel_values") is not None for s in row) else None),
                "num_tiles": [n for s in row for n in s["num_tiles"]],
                "num_frames": [n for s in row for n in s["num_frames"]],
            })
        batch = self.collate(joined)
        seq_idx = torch.empty(batch["input_ids"].shape, dtype=torch.int32)
        for r, row in enumerate(rows):
            seq_idx[r].fill_(len(row))
            pos = 0
            for k, s in enumerate(row):
                n = int(s["input_ids"].numel())
                seq_idx[r, pos:pos + n] = k
                pos += n
        batch["seq_idx"] = seq_idx
        batch["num_samples"] = torch.tensor([len(row) for row in rows], dtype=torch.long)
        # The same boundaries in the varlen kernels' form, found here on the host so that the model
        # needs no GPU synchronisation to find them.
        from nvl_nemotron_vl.model.kernels import cu_seqlens_from_seq_idx

        cu = cu_seqlens_from_seq_idx(seq_idx).tolist()
        batch["cu_seqlens"] = tuple(cu)  # host ints: the model needs them on the host and on the GPU
        batch["max_seqlen"] = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
        return batch

    def process_batch(self, conversations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``collate([self(c) for c in conversations])``: a DataLoader ``collate_fn`` that does the
        processing in the workers (a bound method of a picklable object pickles)."""
        return self.collate([self(c) for c in conversations])

    # -- inspection ---------------------------------------------------------------------------
    def render_tokens(self, input_ids: Sequence[int] | torch.Tensor) -> str:
        """Decode token ids with each tile's or frame's context tokens collapsed to one marker.

        A tile of 256 ``<image>`` tokens shows as ``<image*256>`` (``<video*256>`` for a frame).
        """
        ids = [int(i) for i in input_ids]
        n_tok = self.num_image_token
        out: list[str] = []
        plain: list[int] = []
        i = 0
        while i < len(ids):
            tid = ids[i]
            if tid in (self.img_context_id, self.video_context_id):
                j = i
                while j < len(ids) and ids[j] == tid:
                    j += 1
                if plain:
                    out.append(self.tokenizer.decode(plain, skip_special_tokens=False))
                    plain = []
                token = self.config.img_context_token if tid == self.img_context_id else self.config.video_context_token
                full, rest = divmod(j - i, n_tok)
                out.append(f"{token[:-1]}*{n_tok}>" * full + (f"{token[:-1]}*{rest}>" if rest else ""))
                i = j
            else:
                plain.append(tid)
                i += 1
        if plain:
            out.append(self.tokenizer.decode(plain, skip_special_tokens=False))
        return "".join(out)

    def preview(self, conversation: Mapping[str, Any], *, where: str = "example") -> dict[str, Any]:
        """A summary of what the model will see for ``conversation`` (used by ``nvl data preview``).

        :returns: ``num_images``, ``tiles_per_image``, ``num_frames`` (all videos together),
            ``num_tokens``, ``num_supervised_tokens``, ``prompt`` (the whole rendered sequence,
            context tokens collapsed per tile), ``target`` (the assistant answers, one per line)
            and ``supervised`` (the supervised tokens decoded, one assistant span per line).
        """
        sample = self(conversation, where=where)
        _, _, targets = self._render(conversation, where, False)
        mask = sample["loss_mask"]
        ids = sample["input_ids"]
        # loss_mask[i] marks the prediction of token i+1: supervised tokens are ids[1:][mask[:-1]].
        sup_tokens = torch_shift_select(ids, mask)
        return {
            "num_images": len(sample["num_tiles"]),
            "tiles_per_image": list(sample["num_tiles"]),
            "num_frames": int(sum(sample["num_frames"])),
            "num_tokens": int(ids.numel()),
            "num_supervised_tokens": int(sample["num_supervised_tokens"]),
            "prompt": self.render_tokens(ids),
            "target": "\n".join(targets),
            "supervised": "\n".join(self.tokenizer.decode(span, skip_special_tokens=False) for span in sup_tokens),
        }


def torch_shift_select(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> list[list[int]]:
    """The supervised tokens (the targets of positions where ``loss_mask`` is set), as contiguous runs."""
    targets = input_ids[1:].tolist()
    mask = loss_mask[:-1].tolist()
    runs: list[list[int]] = []
    current: list[int] = []
    for tok, m in zip(targets, mask, strict=True):
        if m:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs
