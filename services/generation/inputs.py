"""Caller-supplied input images: checked to be real, modest images before
anything is stored, so no upload reaches ComfyUI that it would choke on."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
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
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
# Adam7's passes: first column, first row, column step, row step.
ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
INFLATE_PIECE = 1 << 20


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
                    if probe.format == "PNG" and not _png_rows_complete(data):
                        return "PNG pixel data is cut short or corrupt"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return "image too large once decoded"
    except Exception:
        return "not a readable PNG, JPEG or WebP image"
    return None


def _png_rows_complete(data: bytes) -> bool:
    """Whether the PNG's pixel data inflates to exactly the rows its header
    promises. verify() checks only the chunks' checksums, and decoding the
    image would hold it all in memory (256 MB at the largest size allowed);
    inflated a piece at a time, any size costs a megabyte."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = depth * PNG_CHANNELS[colour]
    expected = 0
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        columns, rows = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if columns > 0 and rows > 0:
            expected += rows * (1 + (columns * bits + 7) // 8)  # a filter byte per row
    inflater = zlib.decompressobj()
    produced, pos = 0, 8
    try:
        while pos + 8 <= len(data) and produced <= expected:
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            if data[pos + 4 : pos + 8] == b"IDAT":
                pending = data[pos + 8 : pos + 8 + length]
                while pending and produced <= expected:
                    produced += len(inflater.decompress(pending, INFLATE_PIECE))
                    pending = inflater.unconsumed_tail
            pos += 12 + length
        produced += len(inflater.flush())
    except zlib.error:
        return False
    return inflater.eof and produced == expected
