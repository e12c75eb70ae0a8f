"""Shared pytest fixtures (fixtures only: helpers that several test modules use)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image


def _encode(image: Image.Image, fmt: str, **save_kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


# Mid grey (opaque where there is alpha) in each mode's own units.
_DEFAULT_COLORS: dict[str, Any] = {
    "1": 1,
    "LA": (128, 255),
    "PA": (128, 255),
    "RGB": (128, 128, 128),
    "RGBA": (128, 128, 128, 255),
    "CMYK": (0, 0, 0, 127),
    "I;16": 32896,
    "I": 32896,
    "F": 0.5,
}


@pytest.fixture
def encode_image() -> Callable[..., bytes]:
    """``encode_image(image, fmt="PNG", **save_kwargs) -> bytes``: a Pillow image, encoded."""

    def encode(image: Image.Image, fmt: str = "PNG", **save_kwargs: Any) -> bytes:
        return _encode(image, fmt, **save_kwargs)

    return encode


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """``image_bytes(fmt="PNG", mode="RGB", size=(32, 32), color=None, **save_kwargs) -> bytes``.

    A solid-colour image made by Pillow and encoded in ``fmt`` ("PNG", "JPEG", "WEBP", ...).
    ``color`` is anything ``Image.new`` accepts for ``mode``; None gives a mid grey/colour.
    """

    def make(
        fmt: str = "PNG",
        mode: str = "RGB",
        size: tuple[int, int] = (32, 32),
        color: Any = None,
        **save_kwargs: Any,
    ) -> bytes:
        if color is None:
            color = _DEFAULT_COLORS.get(mode, 128)
        return _encode(Image.new(mode, size, color), fmt, **save_kwargs)

    return make
