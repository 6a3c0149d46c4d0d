"""A horizontal bar chart written as PNG with the standard library (no plotting dependency)."""
from __future__ import annotations

import struct
import zlib

import numpy as np

# 3x5 bitmap digits, '.', '-' for value labels
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000",
}


def _text(img: np.ndarray, x: int, y: int, s: str, scale: int = 2) -> None:
    for ch in s:
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        for i, bit in enumerate(glyph):
            if bit == "1":
                r, c = divmod(i, 3)
                img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = (0, 0, 0)
        x += 4 * scale


def bar_chart(values: list[float], highlight: list[bool], path: str, bar_height: int = 6) -> None:
    """One bar per value (e.g. SQNR in dB per module), highlighted ones in red, value printed."""
    width, label_w, pad = 520, 60, 2
    height = max(1, len(values)) * (bar_height + pad) + 10
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    top = max(max(values, default=1.0), 1e-9)
    for i, (v, hot) in enumerate(zip(values, highlight)):
        y = 5 + i * (bar_height + pad)
        length = int((width - label_w - 10) * max(v, 0) / top)
        img[y:y + bar_height, 5:5 + length] = (200, 40, 40) if hot else (60, 110, 190)
        if bar_height >= 10:
            _text(img, width - label_w, y, f"{v:.1f}")
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)
