"""Parameter lists shaped like real models (``--models``): the shapes only, no model is built."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch


MODEL_NAMES = ("gpt2-small", "gpt2-medium", "resnet50", "small-tensors")


def gpt2_shapes(vocab: int, ctx: int, d: int, layers: int) -> List[Tuple[int, ...]]:
    """HF GPT-2 parameter shapes (Conv1D weights are (in, out); lm_head is tied to wte)."""
    shapes: List[Tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def resnet50_shapes(width: int = 64, num_classes: int = 1000) -> List[Tuple[int, ...]]:
    """torchvision resnet50 parameter shapes (conv weight, then BN weight and bias; downsample in block 0)."""
    shapes: List[Tuple[int, ...]] = [(width, 3, 7, 7), (width,), (width,)]
    inplanes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2 ** stage
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(num_classes, inplanes), (num_classes,)]
    return shapes


def small_tensor_shapes(count: int = 10_000, max_size: int = 4096, seed: int = 0) -> List[Tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    sizes = torch.exp(u * math.log(max_size)).floor().clamp_(1, max_size).long().tolist()
    return [(s,) for s in sizes]


def model_shapes(name: str, quick: bool) -> List[Tuple[int, ...]]:
    if name == "gpt2-small":
        return gpt2_shapes(2048, 128, 128, 2) if quick else gpt2_shapes(50257, 1024, 768, 12)
    if name == "gpt2-medium":
        return gpt2_shapes(2048, 128, 192, 3) if quick else gpt2_shapes(50257, 1024, 1024, 24)
    if name == "resnet50":
        return resnet50_shapes(8, 100) if quick else resnet50_shapes()
    if name == "small-tensors":
        return small_tensor_shapes(1000) if quick else small_tensor_shapes()
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")


def numel_of(shapes: Sequence[Tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)
