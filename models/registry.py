"""A name -> constructor table, so that `--model NAME` needs no if-chain.

Our own small table rather than timm's registry: this project's plain `convnext_tiny` (official
state-dict layout, EmoNeXt's code path) must not shadow timm's model of the same name. The
`emonext_*` sizes, which timm does not have, are registered with timm as well (models/emonext.py).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_META: dict[str, dict] = {}


def register_model(name: str, fn: Callable[..., nn.Module], **meta) -> None:
    """Register `fn(**kwargs) -> nn.Module` under `name`; `meta` (e.g. size) is kept for lookups."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    _META[name] = meta


def model_constructor(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def model_meta(name: str) -> dict:
    return _META.get(name, {})


def list_models(pattern: str = "") -> list[str]:
    """Registered model names containing `pattern`, sorted."""
    return sorted(n for n in _MODELS if pattern in n)
