"""The pictures the simulator 'generates': real PNGs sized as the graph asks.

Sizes follow the graph (EmptyLatentImage/EmptyImage width, height and
batch_size; a LoadImage's file; upscale nodes scale), and pixels are noise
drawn from the graph's seed, so the same seed gives the same image and a
different seed a different one, and outputs are as incompressible as photos.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

DEFAULT_SIZE = (512, 512)
Size = tuple[int, int, int]  # width, height, batch


def output_size(graph: Mapping[str, Any], node_id: str, input_path: Callable[[str], Path]) -> Size:
    """Width, height and batch of the images that reach `node_id`."""
    return _size(graph, node_id, input_path, depth=0)


def _size(
    graph: Mapping[str, Any], node_id: str, input_path: Callable[[str], Path], depth: int
) -> Size:
    node = graph.get(node_id)
    if node is None or depth > 64:
        return (*DEFAULT_SIZE, 1)
    kind, inputs = node["class_type"], node.get("inputs", {})
    if kind in ("EmptyLatentImage", "EmptyImage", "EmptySD3LatentImage"):
        return (
            int(inputs.get("width", 512)),
            int(inputs.get("height", 512)),
            int(inputs.get("batch_size", 1)),
        )
    if kind in ("LoadImage", "LoadImageMask"):
        try:
            with Image.open(input_path(str(inputs.get("image", "")))) as image:
                return image.width, image.height, 1
        except (OSError, ValueError):
            return (*DEFAULT_SIZE, 1)
    upstream = _first_link(inputs)
    width, height, batch = (
        _size(graph, upstream, input_path, depth + 1) if upstream else (*DEFAULT_SIZE, 1)
    )
    if kind in ("LatentUpscale", "ImageScale"):
        return int(inputs.get("width", width)), int(inputs.get("height", height)), batch
    if kind in ("LatentUpscaleBy", "ImageScaleBy"):
        scale = float(inputs.get("scale_by", inputs.get("scale", 2.0)))
        return max(1, round(width * scale)), max(1, round(height * scale)), batch
    if kind == "ImageUpscaleWithModel":
        return width * 2, height * 2, batch
    return width, height, batch


def _first_link(inputs: Mapping[str, Any]) -> str | None:
    for key in ("samples", "images", "image", "pixels", "latent_image", "latent"):
        value = inputs.get(key)
        if isinstance(value, list) and len(value) == 2:
            return str(value[0])
    for value in inputs.values():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            return value[0]
    return None


def graph_seed(graph: Mapping[str, Any]) -> int:
    for node in graph.values():
        inputs = node.get("inputs", {})
        for key in ("seed", "noise_seed"):
            if isinstance(inputs.get(key), int):
                return int(inputs[key])
    return 0


def render_png(width: int, height: int, seed: int) -> bytes:
    pixels = random.Random(seed).randbytes(width * height * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()
