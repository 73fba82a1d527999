"""Built-in plugin: a synthetic visual question answering dataset that can only be solved by looking.

Each example is a picture of one coloured shape at a random place and size, with a question about
its colour or its kind. Answers are balanced, so a model that ignores the image stays at chance
(1/4 for colour questions, 1/3 for shape questions). It needs no download: images are drawn with
PIL, deterministically from ``(seed, split, index)``. The quickstart uses it; it is also a small
example of a dataset maker.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from nvlcore.hookspecs import hookimpl

if TYPE_CHECKING:
    from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (235, 205, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTIONS: dict[str, str] = {
    "color": "What color is the shape? Answer with one word.",
    "shape": "Which shape is shown? Answer with one word.",
}
_SPLIT_OFFSET = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


def draw_shape(shape: str, color: str, *, size: int, rng: random.Random) -> Image.Image:
    """Draw one shape of ``color`` on a light background of ``size`` x ``size`` pixels."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size * 2 // 5, size * 3 // 4)
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent - 1), (x0 + extent - 1, y0 + extent - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return image


@attrs.define
class SyntheticShapesKwargs:
    """``dataset.maker_kwargs`` of ``synthetic_shapes``.

    :param num_examples: examples per split (``None``: 2000 for train, 100 for validation and test).
    :param image_size: side of the square images in pixels.
    :param questions: which questions to ask: ``color``, ``shape`` or both.
    :param seed: seed of the drawing; splits never share an image.
    :param blank_images: replace every image by a blank one (the "blind" control).
    """

    num_examples: int | None = None
    image_size: int = 64
    questions: list[str] = attrs.field(factory=lambda: ["color", "shape"])
    seed: int = 0
    blank_images: bool = False


class ShapesMetrics:
    """``synthetic_shapes``' metric: exact match of the normalised answer (one word: a colour or a shape)."""

    names: ClassVar[tuple[str, ...]] = ("exact_match",)
    max_new_tokens: ClassVar[int] = 8

    def score(self, prediction: str, reference: str, sample: Any = None) -> dict[str, float]:
        from nvlcore.eval.metrics import exact_match

        return {"exact_match": exact_match(prediction, reference)}


class SyntheticShapes:
    """The ``synthetic_shapes`` dataset maker: ``SyntheticShapes(split="train", **maker_kwargs)``."""

    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")
    Kwargs: ClassVar[type] = SyntheticShapesKwargs
    #: scored by ``nvl eval`` (and the quickstart) with exact match
    metrics: ClassVar[type] = ShapesMetrics

    def __init__(self, *, split: str = "train", **maker_kwargs: Any) -> None:
        if split not in self.splits:
            raise ValueError(f"synthetic_shapes has splits {', '.join(self.splits)}; got {split!r}")
        self.kwargs = SyntheticShapesKwargs(**maker_kwargs)
        for q in self.kwargs.questions:
            if q not in QUESTIONS:
                raise ValueError(
                    f"dataset.maker_kwargs.questions: unknown question kind {q!r}; choose from {', '.join(QUESTIONS)}"
                )
        if not self.kwargs.questions:
            raise ValueError("dataset.maker_kwargs.questions: give at least one of " + ", ".join(QUESTIONS))
        self.split = split
        default = 2000 if split == "train" else 100
        self.num_examples = default if self.kwargs.num_examples is None else int(self.kwargs.num_examples)
        if self.num_examples <= 0:
            raise ValueError(f"dataset.maker_kwargs.num_examples must be positive, got {self.num_examples}")

    def __len__(self) -> int:
        return self.num_examples

    def example(self, index: int) -> dict[str, Any]:
        """The raw example: ``image``, ``question``, ``answer``, ``kind``, ``shape``, ``color``."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"synthetic_shapes/{self.split}: index {index} out of range 0..{self.num_examples - 1}")
        rng = random.Random((self.kwargs.seed * 10_000_019) + _SPLIT_OFFSET[self.split] + index)
        # Balanced answers: cycle through the classes instead of sampling them, so that a model
        # that ignores the image can do no better than chance.
        kinds = self.kwargs.questions
        kind = kinds[index % len(kinds)]
        j = index // len(kinds)
        color = list(COLORS)[(j if kind == "color" else rng.randrange(len(COLORS))) % len(COLORS)]
        shape = SHAPES[(j if kind == "shape" else rng.randrange(len(SHAPES))) % len(SHAPES)]
        image = draw_shape(shape, color, size=self.kwargs.image_size, rng=rng)
        if self.kwargs.blank_images:
            from PIL import Image

            image = Image.new("RGB", image.size, (255, 255, 255))
        answer = color if kind == "color" else shape
        return {"image": image, "question": QUESTIONS[kind], "answer": answer, "kind": kind,
                "shape": shape, "color": color}

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.example(index)
        return {
            "conversation": [
                {"role": "user", "content": [{"type": "image", "image": ex["image"]},
                                             {"type": "text", "text": ex["question"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": ex["answer"]}]},
            ]
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]


@hookimpl
def nvl_register_dataset_makers(register: Any) -> None:
    register("synthetic_shapes", "nvlcore.builtin.synthetic_vqa:SyntheticShapes", aliases=("shapes",))
