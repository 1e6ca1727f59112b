"""Which key a mistyped config key meant: the nearest valid key at its level of a pydantic model.

``--set pretrain.epoch=2`` → ``pretrain.epochs``; a key that belongs one level further down,
``--set pretrain.lr=1``, → ``pretrain.mae.lr``, ``pretrain.head.lr``,
``pretrain.mask.lr``. The spelling match is :func:`maskkit.errors.closest_name`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

from pydantic import BaseModel

from maskkit.errors import closest_name


def key_suggestion(model: type[BaseModel], location: Sequence[Any]) -> str:
    """``"did you mean a.b? "`` (or ``"a.b, a.c or a.d"``) for an unknown key, else ``""``."""
    keys = suggested_keys(model, location)
    if not keys:
        return ""
    listed = keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} or {keys[-1]}"
    return f"did you mean {listed}? "


def suggested_keys(model: type[BaseModel], location: Sequence[Any]) -> list[str]:
    """Dotted keys ``location`` (a pydantic error's ``loc``, the unknown key last) may have meant.

    The nearest-spelled key at the unknown key's level when one is close; else the keys of that
    name one level down; else none. List items (integer parts of ``location``) are walked through.
    """
    *parents, name = location
    level = _model_at(model, parents)
    if level is None:
        return []
    prefix = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parents).lstrip(".")
    joined = f"{prefix}." if prefix else ""
    nearest = closest_name(str(name), level.model_fields)
    if nearest is not None:
        return [joined + nearest]
    return [
        f"{joined}{field}.{name}"
        for field, info in level.model_fields.items()
        if (child := _model_in(info.annotation)) is not None and name in child.model_fields
    ]


def _model_at(model: type[BaseModel], path: Sequence[Any]) -> type[BaseModel] | None:
    """The model class found at ``path`` below ``model``, or None (a dict, a scalar, a bad path)."""
    current: type[BaseModel] | None = model
    for part in path:
        if isinstance(part, int):  # an item of a list of models: the same model
            continue
        field = current.model_fields.get(str(part)) if current is not None else None
        if field is None:
            return None
        current = _model_in(field.annotation)
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class in a field's annotation: ``M``, ``M | None``, ``list[M]``; else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
