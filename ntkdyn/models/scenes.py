"""ShapesWorld scenes through an adapter's image tokens, both ways: the glue between the world's
exact oracle and any unified model. The trainer (self-improvement data, understanding replay) and the
evaluation both need it, so it sits in the models layer, below both.

    world_images      scenes -> render -> resize to the adapter's image size -> adapter.encode -> tokens
    oracle_of_images  tokens -> adapter.decode -> resize to the world's size -> world.parse -> oracle
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.world import Prompt, ShapesWorld


def resize_pixels(pixels: torch.Tensor, size: int | tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resize uint8 pixels [B, H, W, 3] to [B, *size, 3] with torch interpolate ``mode`` (no-op at
    that size). World scenes go to a model's size by "nearest" (exact at integer factors); a model's
    images come back to the world's by "area", which keeps shapes parseable from as low as 32 px."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(pixels.shape[1:3]) == size:
        return pixels
    resized = torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2).float(), size=size, mode=mode)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def world_images(adapter: UnifiedAdapter, world: ShapesWorld, scenes: Sequence) -> torch.Tensor:
    """World scenes as the adapter's image tokens: render, nearest-neighbour resize to
    ``adapter.image_size`` (a real model's own resolution), encode: LongTensor[B, L]."""
    pixels = torch.from_numpy(np.stack([world.render(scene) for scene in scenes]))
    return adapter.encode(resize_pixels(pixels, getattr(adapter, "image_size", world.image_size)))


def oracle_of_images(
    adapter: UnifiedAdapter, world: ShapesWorld, prompts: Sequence[Prompt], images: torch.Tensor
) -> tuple[list[bool], list[bool]]:
    """(oracle, parsed) of the adapter's images [B, L] for prompts[b]: the exact oracle on
    world.parse of adapter.decode(images) resized ("area") to the world's image size;
    pixels that cannot be parsed give (False, False)."""
    pixels = resize_pixels(adapter.decode(images), world.image_size, mode="area")
    oracle, parsed = [], []
    for prompt, image_pixels in zip(prompts, pixels, strict=True):
        try:
            scene = world.parse(image_pixels)
        except ValueError:
            oracle.append(False)
            parsed.append(False)
            continue
        oracle.append(bool(world.oracle(prompt, scene)))
        parsed.append(True)
    return oracle, parsed
