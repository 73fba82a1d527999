"""CORD-v2 metrics of the Donut paper (Kim et al., 2022, and its ``donut/util.py``), which
Megatron-Bridge's CORD-v2 recipe reports:

* ``ted_accuracy``: per receipt, ``max(0, 1 - TED(pred, gt) / TED(empty, gt))`` over the parsed
  trees (Zhang-Shasha tree edit distance from the ``zss`` package; a leaf's update costs the
  characters' edit distance, an inner node's 1), averaged over receipts;
* ``field_f1``: F1 of the ``(key path, value)`` fields over the whole split
  (``tp / (tp + (fp + fn) / 2)``, counted over all receipts together, as Donut does).

Both texts are first parsed back to JSON from the ``<s_key>...</s_key>`` tokens the maker's
:func:`~nvl_data_cord_v2.maker.json2token` writes (:func:`token2json`, Donut's parser), then
normalised the way Donut normalises them (keys sorted, empty values dropped, leaves as lists).
``zss`` is imported only when a tree distance is computed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from nvlcore.eval.metrics import levenshtein

_START = re.compile(r"<s_(.*?)>", re.IGNORECASE)


def token2json(tokens: str, *, is_inner_value: bool = False) -> Any:
    """Donut's ``token2json``: ``<s_key>value</s_key>`` sequences to a dict; ``<sep/>`` separates list
    items; text without any tag gives ``{"text_sequence": text}``.

    >>> token2json("<s_total><s_total_price>45,500</s_total_price></s_total><s_menu><s_nm>A</s_nm></s_menu>")
    {'total': {'total_price': '45,500'}, 'menu': {'nm': 'A'}}
    """
    output: dict[str, Any] = {}
    while tokens:
        start = _START.search(tokens)
        if start is None:
            break
        key = start.group(1)
        end = re.search(rf"</s_{re.escape(key)}>", tokens, re.IGNORECASE)
        start_token = start.group()
        if end is None:
            tokens = tokens.replace(start_token, "")
            continue
        end_token = end.group()
        content = re.search(f"{re.escape(start_token)}(.*?){re.escape(end_token)}", tokens, re.IGNORECASE | re.DOTALL)
        if content is not None:
            inner = content.group(1).strip()
            if "<s_" in inner and "</s_" in inner:  # an inner node
                value = token2json(inner, is_inner_value=True)
                if value:
                    output[key] = value[0] if len(value) == 1 else value
            else:  # leaves
                leaves = [leaf.strip() for leaf in inner.split("<sep/>")]
                output[key] = leaves[0] if len(leaves) == 1 else leaves
        tokens = tokens[tokens.find(end_token) + len(end_token):].strip()
        if tokens[:6] == "<sep/>":  # the next item of a list of inner nodes
            return [output] + token2json(tokens[6:], is_inner_value=True)
    if output:
        return [output] if is_inner_value else output
    return [] if is_inner_value else {"text_sequence": tokens}


def normalize_dict(data: Any) -> Any:
    """Donut's ``JSONParseEvaluator.normalize_dict``: keys sorted by (length, name), empty values
    dropped, every leaf value a list of stripped strings."""
    if not data:
        return {}
    if isinstance(data, dict):
        out: Any = {}
        for key in sorted(data, key=lambda k: (len(k), k)):
            value = normalize_dict(data[key])
            if value:
                out[key] = value if isinstance(value, list) else [value]
        return out
    if isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            return [n for n in (normalize_dict(item) for item in data) if n]
        return [str(item).strip() for item in data if type(item) in (str, int, float) and str(item).strip()]
    return [str(data).strip()]


def flatten(data: Any) -> list[tuple[str, str]]:
    """``(dotted key path, leaf value)`` for every leaf of a normalised parse."""
    out: list[tuple[str, str]] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        else:
            out.append((key, value))

    walk(data)
    return out


def field_counts(prediction: Any, answer: Any) -> tuple[int, int]:
    """``(true positives, false positives + false negatives)`` of the fields of two parses."""
    pred, ans = flatten(normalize_dict(prediction)), flatten(normalize_dict(answer))
    tp = wrong = 0
    for field in pred:
        if field in ans:
            tp += 1
            ans.remove(field)
        else:
            wrong += 1
    return tp, wrong + len(ans)


def f1_from_counts(tp: int, wrong: int) -> float:
    """``tp / (tp + wrong / 2)``; 1.0 when there are no fields on either side."""
    return tp / (tp + wrong / 2) if tp + wrong else 1.0


def _tree(data: Any, name: str = "<root>") -> Any:
    from zss import Node

    node = Node(name)
    if isinstance(data, dict):
        for key, value in data.items():
            node.addkid(_tree(value, key))
    elif isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            for item in data:
                node.addkid(_tree(item, "<subtree>"))
        else:
            for item in data:
                node.addkid(Node(f"<leaf>{item}"))
    else:
        raise ValueError(f"cannot build a tree from {data!r} under {name!r}")
    return node


def _insert_remove_cost(node: Any) -> int:
    label = node.label
    return len(label.replace("<leaf>", "")) if "<leaf>" in label else 1


def _update_cost(a: Any, b: Any) -> int:
    la, lb = a.label, b.label
    leaf_a, leaf_b = "<leaf>" in la, "<leaf>" in lb
    if leaf_a and leaf_b:
        return levenshtein(la.replace("<leaf>", ""), lb.replace("<leaf>", ""))
    if leaf_a != leaf_b:
        return 1 + len((la if leaf_a else lb).replace("<leaf>", ""))
    return int(la != lb)


def tree_distance(a: Any, b: Any) -> int:
    """Zhang-Shasha tree edit distance between two normalised parses, with Donut's costs."""
    import zss

    return int(zss.distance(_tree(a), _tree(b), get_children=zss.Node.get_children,
                            insert_cost=_insert_remove_cost, remove_cost=_insert_remove_cost,
                            update_cost=_update_cost))


def ted_accuracy(prediction: Any, answer: Any) -> float:
    """``max(0, 1 - TED(pred, answer) / TED(empty, answer))`` of two parses (dicts)."""
    pred, ans = normalize_dict(prediction), normalize_dict(answer)
    worst = tree_distance({}, ans)
    if worst == 0:  # an empty answer: only an empty prediction is right
        return float(tree_distance(pred, ans) == 0)
    return max(0.0, 1.0 - tree_distance(pred, ans) / worst)


class CordMetrics:
    """The ``make_cord_v2_dataset`` maker's metrics (see the module docstring)."""

    names: ClassVar[tuple[str, ...]] = ("ted_accuracy", "field_f1")
    max_new_tokens: ClassVar[int] = 768

    def score(self, prediction: str, reference: str, sample: Mapping[str, Any] | None = None) -> dict[str, float]:
        pred, ref = token2json(prediction), token2json(reference)
        tp, wrong = field_counts(pred, ref)
        return {"ted_accuracy": ted_accuracy(pred, ref), "field_f1": f1_from_counts(tp, wrong),
                "_tp": float(tp), "_wrong": float(wrong)}

    def aggregate(self, scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
        if not scores:
            return {}
        tp = sum(s["_tp"] for s in scores)
        wrong = sum(s["_wrong"] for s in scores)
        return {"ted_accuracy": sum(s["ted_accuracy"] for s in scores) / len(scores),
                "field_f1": f1_from_counts(int(tp), int(wrong))}
