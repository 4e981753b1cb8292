"""Crafted bad inputs, made in the tests: payloads that would leave a marker file if they ran,
and photos that are broken, tiny, thin, bombs or not photos at all."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


class Payload:
    """Unpickling it calls ``function(*args)``: what a crafted checkpoint would run."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def exec_payload(marker: Path) -> Payload:
    """Python code that writes ``marker`` if a file's pickle is ever run."""
    return Payload(exec, f"open({str(marker)!r}, 'w').write('payload ran')")


def system_payload(marker: Path) -> Payload:
    """A shell command that writes ``marker`` if a file's pickle is ever run."""
    return Payload(os.system, f"touch {marker}")


def postscript(marker: Path) -> bytes:
    """A PostScript program that writes ``marker`` if Ghostscript ever runs it."""
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
        + f"({marker}) (w) file dup (ran) writestring closefile\n".encode()
        + b"showpage\n"
    )


def eps_with_tiff_preview(marker: Path) -> bytes:
    """A DOS EPS binary (magic C5D0D3C6): its 30-byte header, the PostScript, a TIFF preview."""
    program = postscript(marker)
    tiff = b"II*\x00\x08\x00\x00\x00\x00\x00"  # a TIFF header and an empty directory
    header = struct.pack(
        "<4sIIIIIIH",
        b"\xc5\xd0\xd3\xc6",
        30,
        len(program),
        0,
        0,
        30 + len(program),
        len(tiff),
        0xFFFF,
    )
    return header + program + tiff


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header claims ``width`` x ``height`` pixels (RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 256)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def scene(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random-blocks RGB picture (something to segment)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (max(1, height // 8) + 1, max(1, width // 8) + 1, 3))
    pixels = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]
    return Image.fromarray(pixels.astype(np.uint8))


def write_bad_photos(folder: Path, marker: Path) -> dict[str, str]:
    """Photos that cannot be segmented: file name -> the problem predict reports for it."""
    folder.mkdir(parents=True, exist_ok=True)
    scene(1, 1).save(folder / "dot.png")
    scene(50, 3).save(folder / "sliver.png")
    (folder / "bomb.png").write_bytes(png_claiming(20000, 20000))
    (folder / "script.jpg").write_bytes(postscript(marker))
    (folder / "empty.jpg").write_bytes(b"")
    scene(64, 64).save(folder / "whole.jpg", quality=90)
    jpeg = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "notes.png").write_text("not a picture at all\n")
    formats = "entityseg reads JPEG, PNG, BMP, TIFF, WEBP, GIF"
    return {
        "dot.png": "image of 1x1 pixels is too small to segment (both sides must be at least "
        "4 pixels)",
        "sliver.png": "image of 3x50 pixels is too small to segment (both sides must be at "
        "least 4 pixels)",
        "bomb.png": "refused as a decompression bomb (Image size (400000000 pixels) exceeds "
        "limit of 178956970 pixels, could be decompression bomb DOS attack.)",
        "script.jpg": f"not an image file ({formats})",
        "empty.jpg": "image file is empty (0 bytes)",
        "cut.jpg": "corrupt image (",  # Pillow's own words follow
        "notes.png": f"not an image file ({formats})",
    }


def write_odd_photos(folder: Path) -> list[str]:
    """Photos that are awkward but fine, in every mode and format we read: their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = scene(48, 64, seed=1)
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("1").save(folder / "bilevel.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    grey16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(folder / "deep.tif")
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32)).save(folder / "float.tif")
    rgb.save(folder / "lossless.webp", lossless=True)
    rgb.save(folder / "plain.bmp")
    scene(6, 2000, seed=2).save(folder / "strip.png")  # resized to a 1-pixel-high view
    return sorted(p.name for p in folder.iterdir())
