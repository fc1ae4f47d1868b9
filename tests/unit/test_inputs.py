"""Input images are decoded far enough to know ComfyUI can read them, and no
further: a PNG's pixel data is inflated piece by piece, never held whole."""

from __future__ import annotations

import io
import zlib

import pytest
from hypothesis import given
from PIL import Image

from services.contracts import gen
from services.errors import InvalidArgument
from services.generation.inputs import check_images
from tests.fuzz.strategies import PNG_ROWS, png_with_pixels, pngs_with_bad_pixels


def problem(data: bytes) -> str | None:
    try:
        check_images([gen.InputImage(name="in.png", data=data)])
    except InvalidArgument as error:
        return error.violations[0][1]
    return None


@pytest.mark.parametrize(
    ("mode", "size"),
    [("RGB", (64, 64)), ("RGBA", (65, 17)), ("L", (13, 9)), ("P", (13, 9)), ("1", (100, 37))],
)
def test_real_pngs_of_every_colour_type_and_odd_sizes_pass(
    mode: str, size: tuple[int, int]
) -> None:
    out = io.BytesIO()
    Image.effect_noise(size, 50).convert(mode).save(out, format="PNG")
    assert problem(out.getvalue()) is None


def test_an_interlaced_png_passes_when_its_seven_passes_are_all_there() -> None:
    # 8x8 RGB in Adam7: passes of 1x1, 1x1, 2x1, 2x2, 4x2, 4x4 and 8x4 pixels,
    # each row with its filter byte: 207 bytes (all black).
    whole = png_with_pixels(zlib.compress(bytes(207)), interlace=1)
    with Image.open(io.BytesIO(whole)) as decoded:  # PIL reads it as whole
        decoded.load()
    assert problem(whole) is None
    short = png_with_pixels(zlib.compress(bytes(206)), interlace=1)
    assert problem(short) == "PNG pixel data is cut short or corrupt"


def test_the_rows_a_png_header_promises_are_exactly_the_rows_it_holds() -> None:
    assert problem(png_with_pixels(zlib.compress(bytes(PNG_ROWS)))) is None
    for pixels in (
        zlib.compress(bytes(10)),  # cut short
        zlib.compress(bytes(PNG_ROWS + 1)),  # one byte too many
        zlib.compress(bytes(PNG_ROWS))[:-4],  # the stream never ends
        b"not zlib at all",
    ):
        assert problem(png_with_pixels(pixels)) == "PNG pixel data is cut short or corrupt"


@given(pngs_with_bad_pixels())
def test_no_png_with_wrong_pixel_data_passes(data: bytes) -> None:
    assert problem(data) is not None
