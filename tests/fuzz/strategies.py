"""Hostile values for the fuzz suites: names that climb out of directories,
strings that are empty, huge or full of control characters, numbers at and
beyond every boundary, bytes that are not images or only pretend to be, and
bytes that are not protobuf at all."""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import uuid
import zlib
from collections.abc import Sequence
from datetime import timedelta, timezone
from typing import Any

from hypothesis import strategies as st
from PIL import Image

# Names that try to leave a directory, inject into SQL, shells, templates or
# URLs, or confuse a parser; each is tried alone and embedded in other text.
NASTY = [
    "",
    ".",
    "..",
    "../",
    "../../../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "/etc/passwd",
    "C:\\Windows\\system32",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%2f..%2f",
    "....//....//",
    "..;/",
    "sd15-txt2img/../../secret",
    "sd15-txt2img\x00.json",
    "a\x00b",
    "\x00",
    "~/.ssh/id_rsa",
    "${HOME}",
    "$(id)",
    "`id`",
    "'; DROP TABLE generations; --",
    '" OR 1=1 --',
    "<script>alert(1)</script>",
    "{{7*7}}",
    "%s%s%s%n",
    "\r\nX-Injected: 1",
    "\u202egnp.exe",
    "\ufeffsd15-txt2img",
    "SD15-TXT2IMG",
    "sd15-txt2img ",
    " sd15-txt2img",
    "sd15-txt2img.json",
    "sd15-txt2img.yaml",
    "🙂",
    "NaN",
    "null",
    "-1",
    "0x7fffffff",
    "1e309",
    "urn:uuid:",
    "{00000000-0000-0000-0000-000000000000}",
]

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)


@functools.cache
def big_text(min_size: int = 1_000, max_size: int = 200_000) -> st.SearchStrategy[str]:
    """A long string without building it character by character."""
    return st.builds(
        lambda unit, n: (unit * (n // max(1, len(unit)) + 1))[:n],
        st.sampled_from(["a", "..", "../", "\u00e9", "🙂", "x" * 7 + "/"]),
        st.integers(min_size, max_size),
    )


@functools.cache
def hostile_text(max_size: int = 64) -> st.SearchStrategy[str]:
    """Any text a protobuf string can carry, weighted toward nasty shapes."""
    nasty = st.sampled_from(NASTY)
    return st.one_of(
        nasty,
        st.text(max_size=max_size),
        st.builds(lambda a, b, c: a + b + c, st.text(max_size=8), nasty, st.text(max_size=8)),
        st.text(st.characters(max_codepoint=0x1F), max_size=max_size),
        big_text(),
    )


@functools.cache
def boundary_ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Any integer of a range, often one at or next to an interesting edge."""
    edges = [low, low + 1, -1, 0, 1, 2, 100, 101, 150, 151, 3600, 3601, high - 1, high]
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high)
    )


def hostile_ids(known: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Generation ids: nasty text, ids of nothing, and known ids spelled oddly."""
    spellings = [
        lambda u: str(u).upper(),
        lambda u: "{" + str(u) + "}",
        lambda u: "urn:uuid:" + str(u),
        lambda u: uuid.UUID(u).hex,
        lambda u: " " + str(u),
        lambda u: str(u) + "\n",
        lambda u: str(u)[:-1],
        lambda u: str(u) + "0",
        lambda u: "../" + str(u),
        lambda u: str(u) + "/../../etc/passwd",
    ]
    strategies = [
        hostile_text(),
        st.uuids().map(str),
        st.just("00000000-0000-0000-0000-000000000000"),
    ]
    if known:
        strategies.append(
            st.builds(lambda f, u: f(u), st.sampled_from(spellings), st.sampled_from(known))
        )
    return st.one_of(*strategies)


# ----- images ----------------------------------------------------------------------


def encoded(fmt: str, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, "red").save(out, format=fmt)
    return out.getvalue()


VALID_IMAGES = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "WEBP")}
# Real images of formats the API does not take.
OTHER_FORMATS = [encoded(fmt) for fmt in ("GIF", "BMP", "TIFF", "ICO", "PPM")]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of valid PNG that claim `width` x `height` pixels:
    a decompression bomb to anything that believes the header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1024, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A tiny real JPEG whose frame header is patched to claim a huge size."""
    data = bytearray(VALID_IMAGES["JPEG"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


MAX_PIXELS = 8192 * 8192


@st.composite
def bombs(draw: st.DrawFn) -> bytes:
    """Small files declaring more pixels than the service decodes."""
    if draw(st.booleans()):
        width = draw(st.integers(8193, 2**31 - 1))
        height = draw(st.integers(max(1, MAX_PIXELS // width + 1), 2**31 - 1))
        return png_declaring(width, height)
    width = draw(st.integers(8193, 65535))
    height = draw(st.integers(max(1, MAX_PIXELS // width + 1), 65535))
    return jpeg_declaring(width, height)


INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]


# PIL (and so ComfyUI) stops at the type of the last chunk, IEND: its length
# and CRC are never read, and a file cut or changed only there decodes to the
# same pixels. Everything before it is covered by CRCs.
IEND_CHUNK = 12
IEND_CRC = 4


@st.composite
def truncated_images(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(sorted(VALID_IMAGES)))
    data = VALID_IMAGES[fmt]
    keep = len(data) - 1 - (IEND_CRC if fmt == "PNG" else 0)
    return data[: draw(st.integers(0, keep))]


@st.composite
def corrupted_pngs(draw: st.DrawFn) -> bytes:
    """A valid PNG with one byte changed: CRCs make each change detectable."""
    data = bytearray(VALID_IMAGES["PNG"])
    at = draw(st.integers(0, len(data) - 1 - IEND_CHUNK))
    data[at] ^= draw(st.integers(1, 255))
    return bytes(data)


def png_with_pixels(pixels: bytes, size: tuple[int, int] = (8, 8), interlace: int = 0) -> bytes:
    """An RGB PNG of `size` whose IDAT holds `pixels` as given, every CRC right."""
    header = struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


# The rows of VALID_IMAGES["PNG"]: 8 of a filter byte and 8 RGB pixels.
PNG_ROWS = 8 * (1 + 8 * 3)


@st.composite
def pngs_with_bad_pixels(draw: st.DrawFn) -> bytes:
    """Checksums all right, pixel data wrong: too few or too many rows, or not zlib."""
    rows = draw(st.integers(0, 3 * PNG_ROWS).filter(lambda n: n != PNG_ROWS))
    compressed = zlib.compress(bytes(rows))
    if draw(st.booleans()):
        compressed = compressed[: draw(st.integers(0, len(compressed) - 1))]
    return png_with_pixels(compressed)


# Bytes that must never be taken for a PNG, JPEG or WebP image.
NOT_IMAGES = st.one_of(
    st.binary(max_size=512),
    st.lists(st.sampled_from(INVALID_UTF8), min_size=1, max_size=16).map(b"".join),
    st.sampled_from(OTHER_FORMATS),
    truncated_images(),
    corrupted_pngs(),
    pngs_with_bad_pixels(),
    bombs(),
    st.binary(max_size=64).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail),
    st.binary(max_size=64).map(lambda tail: b"RIFF\x00\x00\x00\x00WEBPVP8 " + tail),
    st.binary(max_size=64).map(lambda tail: b"\xff\xd8\xff\xe0" + tail),
)


# Any JSON value, nested a little.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)

# ----- page tokens ---------------------------------------------------------------


def _pack(value: Any) -> str:
    """`value` as a page token is spelt: JSON (or raw bytes), URL-safe base64."""
    text = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


ZONES = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60, 23 * 60)
)
MOMENTS = st.one_of(
    st.datetimes().map(lambda d: d.isoformat()),
    st.datetimes(timezones=ZONES).map(lambda d: d.isoformat()),
    st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "", "now"]),
    hostile_text(),
)
FORGED_TOKENS = st.one_of(
    hostile_text(),
    JSON_VALUES.map(_pack),
    st.tuples(MOMENTS, st.one_of(st.uuids().map(str), hostile_text(), JSON_VALUES)).map(
        lambda pair: _pack(list(pair))
    ),
    st.integers(1, 10_000).map(lambda depth: _pack(b"[" * depth + b"]" * depth)),
    st.binary(max_size=80).map(_pack),
)


def page_tokens(real: str) -> st.SearchStrategy[str]:
    """Tokens the service never issued: garbage, the right shape with wrong
    contents, and a real token cut short or with a character changed."""
    return st.one_of(
        FORGED_TOKENS,
        st.integers(0, len(real) - 1).map(lambda n: real[:n] or "x"),
        st.tuples(st.integers(0, len(real) - 1), st.characters(codec="utf-8")).map(
            lambda c: real[: c[0]] + c[1] + real[c[0] + 1 :]
        ),
    )


# ----- raw protobuf ---------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def wire_messages(draw: st.DrawFn, depth: int = 2) -> bytes:
    """Bytes shaped like protobuf (tags, wire types, lengths) but free to lie:
    wrong wire types for a field, lengths past the end, invalid UTF-8 in
    strings, truncated varints, groups, reserved wire types."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        number = draw(st.one_of(st.integers(1, 20), st.integers(0, 2**29 - 1)))
        wire = draw(st.sampled_from([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7]))
        parts.append(varint(number << 3 | wire))
        if wire == 0:
            parts.append(varint(draw(st.integers(0, 2**64 - 1))))
        elif wire in (1, 5):
            parts.append(draw(st.binary(min_size=8 if wire == 1 else 4, max_size=8)))
        elif wire == 2:
            payload = draw(
                st.one_of(
                    st.binary(max_size=40),
                    st.lists(st.sampled_from(INVALID_UTF8), min_size=1, max_size=4).map(b"".join),
                    wire_messages(depth - 1) if depth > 0 else st.just(b""),
                )
            )
            length = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32)))
            parts.append(varint(length) + payload)
        else:
            parts.append(draw(st.binary(max_size=8)))
    if draw(st.booleans()):
        parts.append(b"\x80")  # a varint that never ends
    return b"".join(parts)


def raw_requests() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=256), wire_messages())
