"""Named SR-ViT variants: tiny functions over one builder."""

from __future__ import annotations

from collections.abc import Callable

from srvit.model import SRViT, SRViTConfig

_VARIANTS: dict[str, Callable[..., SRViTConfig]] = {}


def register(fn: Callable[..., SRViTConfig]) -> Callable[..., SRViTConfig]:
    _VARIANTS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_VARIANTS)


def model_config(name: str, **overrides) -> SRViTConfig:
    if name not in _VARIANTS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _VARIANTS[name](**overrides)


def create_model(name: str, **overrides) -> SRViT:
    return SRViT(model_config(name, **overrides))


def _deit(embed_dim: int, num_heads: int, **overrides) -> SRViTConfig:
    # The router's hidden width equals the token width: +1.8M parameters on DeiT-S at max_depth 4.
    kw = dict(embed_dim=embed_dim, num_heads=num_heads, router_hidden=embed_dim, num_blocks=12)
    return SRViTConfig(**{**kw, **overrides})


@register
def srvit_tiny_patch16_224(**overrides) -> SRViTConfig:
    return _deit(192, 3, **overrides)


@register
def srvit_small_patch16_224(**overrides) -> SRViTConfig:
    return _deit(384, 6, **overrides)


@register
def srvit_base_patch16_224(**overrides) -> SRViTConfig:
    return _deit(768, 12, **overrides)


@register
def srvit_fashion(**overrides) -> SRViTConfig:
    """28x28 grayscale, 10 classes: small enough to train on two CPU cores."""
    kw = dict(
        img_size=28, patch_size=4, stem="conv", in_chans=1, num_classes=10,
        embed_dim=96, num_blocks=2, num_heads=3, mlp_ratio=2.0, router_hidden=96, stem_convs=5,
    )  # fmt: skip
    return SRViTConfig(**{**kw, **overrides})
