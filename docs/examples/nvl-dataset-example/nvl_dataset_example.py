"""nvl plugin: ``dataset.maker_name=jsonl_qa`` turns a JSON-lines file of question/answer rows
(``{"question": ..., "answer": ..., "image": "optional/path.png"}``) into conversations."""

import json

import attrs

from nvlcore import hookimpl


class JsonlQA:
    splits = ("train",)

    @attrs.define
    class Kwargs:  # validated as dataset.maker_kwargs; `path` has no default, so it is mandatory
        path: str
        prompt_prefix: str = ""
        max_samples: int | None = None

    def __init__(self, *, split: str = "train", **maker_kwargs):
        kw = self.Kwargs(**maker_kwargs)
        with open(kw.path) as f:
            self.rows = [json.loads(line) for line in f if line.strip()][: kw.max_samples]
        self.prefix = kw.prompt_prefix

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        user = [{"type": "image", "image": row["image"]}] if row.get("image") else []
        user.append({"type": "text", "text": self.prefix + row["question"]})
        return {"conversation": [{"role": "user", "content": user},
                                 {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@hookimpl
def nvl_register_dataset_makers(register):
    register("jsonl_qa", JsonlQA, aliases=("example_qa",))
