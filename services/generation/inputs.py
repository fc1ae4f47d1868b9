"""Caller-supplied input images: checked to be real, modest images before
anything is stored, so no upload reaches ComfyUI that it would choke on."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

from PIL import Image

from services.contracts import gen
from services.errors import InvalidArgument
from services.generation.templates import IMAGE_NAME

MAX_IMAGES = 8
MAX_IMAGE_BYTES = 16 * 1024 * 1024
# Beyond this a small file may decode to gigabytes (a decompression bomb).
MAX_PIXELS = 8192 * 8192
FORMATS = {"PNG", "JPEG", "WEBP"}


def check_images(images: Sequence[gen.InputImage]) -> list[tuple[str, bytes]]:
    if len(images) > MAX_IMAGES:
        raise InvalidArgument.field("input_images", f"at most {MAX_IMAGES} images")
    seen: set[str] = set()
    checked = []
    for n, image in enumerate(images):
        where = f"input_images[{n}]"
        if not IMAGE_NAME.fullmatch(image.name):
            raise InvalidArgument.field(
                f"{where}.name", "letters, digits, '.', '_' and '-' only, not starting with '.'"
            )
        if image.name in seen:
            raise InvalidArgument.field(f"{where}.name", f"{image.name!r} given twice")
        seen.add(image.name)
        if len(image.data) > MAX_IMAGE_BYTES:
            raise InvalidArgument.field(f"{where}.data", f"larger than {MAX_IMAGE_BYTES} bytes")
        problem = _image_problem(image.data)
        if problem:
            raise InvalidArgument.field(f"{where}.data", problem)
        checked.append((image.name, bytes(image.data)))
    return checked


def _image_problem(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                if probe.format not in FORMATS:
                    return f"not a PNG, JPEG or WebP image ({probe.format})"
                if probe.width * probe.height > MAX_PIXELS:
                    return f"{probe.width}x{probe.height} is more than {MAX_PIXELS} pixels"
                if probe.format == "JPEG":
                    # verify() reads no JPEG data: decode, at 1/8 scale (at most
                    # 1/64 of the memory), so a cut or corrupt file is refused here
                    # rather than failing in ComfyUI after taking a GPU slot.
                    probe.draft("RGB", (probe.width // 8 or 1, probe.height // 8 or 1))
                    probe.load()
                else:
                    probe.verify()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return "image too large once decoded"
    except Exception:
        return "not a readable PNG, JPEG or WebP image"
    return None
