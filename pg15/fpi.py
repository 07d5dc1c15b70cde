"""Full-page images: decompression (pglz, lz4, zstd) and restoration of the 8192-byte page."""

from __future__ import annotations

import lz4.block
import zstandard

from pg15.constants import BLCKSZ
from pg15.records import BlockImage
from proto.errors import CorruptData


class ImageDecodeError(CorruptData):
    """A full-page image that does not decompress to the size its header promises."""


def restore_page(image: BlockImage) -> bytes:
    """Rebuild the page: decompress if needed, then re-insert the hole as zeros."""
    raw_len = BLCKSZ - image.hole_length
    method = image.compression
    if method is None:
        body = image.data
    elif method == "pglz":
        body = pglz_decompress(image.data, raw_len)
    elif method == "lz4":
        try:
            body = lz4.block.decompress(image.data, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as exc:
            raise ImageDecodeError(f"corrupt lz4 full-page image: {exc}") from exc
    else:
        try:
            body = zstandard.ZstdDecompressor().decompress(image.data, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise ImageDecodeError(f"corrupt zstd full-page image: {exc}") from exc
    if len(body) != raw_len:
        raise ImageDecodeError(
            f"full-page image decompressed to {len(body)} bytes, expected {raw_len}"
        )
    if not image.hole_length:
        return bytes(body)
    hole = image.hole_offset
    return b"".join((body[:hole], bytes(image.hole_length), body[hole:]))


def pglz_decompress(src: bytes, rawsize: int, check_complete: bool = True) -> bytes:
    """Decode PostgreSQL's pglz stream (pg_lzcompress.c) into exactly `rawsize` bytes.

    Each control byte announces 8 items, LSB first: 0 = one literal byte, 1 = a back-reference
    tag of 2 or 3 bytes (length 3..273, offset 1..4095 into the output produced so far).
    Runs of literals are copied as slices, which keeps the Python loop per tag, not per byte.
    """
    dst = bytearray(rawsize)
    sp = 0
    dp = 0
    srcend = len(src)
    trailing_zeros = _TRAILING_ZEROS
    try:
        while sp < srcend and dp < rawsize:
            ctrl = src[sp]
            sp += 1
            bit = 0
            while bit < 8 and sp < srcend and dp < rawsize:
                if ctrl & 1:
                    b0 = src[sp]
                    length = (b0 & 0x0F) + 3
                    off = ((b0 & 0xF0) << 4) | src[sp + 1]
                    sp += 2
                    if length == 18:
                        length += src[sp]
                        sp += 1
                    if sp > srcend or off == 0 or off > dp:
                        raise ImageDecodeError("corrupt pglz data: bad back-reference")
                    if length > rawsize - dp:
                        length = rawsize - dp
                    start = dp - off
                    if off >= length:
                        dst[dp : dp + length] = dst[start : start + length]
                    else:
                        # Overlapping copy: the last `off` bytes repeat.
                        dst[dp : dp + length] = (dst[start:dp] * (length // off + 1))[:length]
                    dp += length
                    ctrl >>= 1
                    bit += 1
                else:
                    # Literals up to the next tag bit (ctrl holds only this byte's bits).
                    run = trailing_zeros[ctrl] if ctrl else 8 - bit
                    if sp + run > srcend:
                        run = srcend - sp
                    if dp + run > rawsize:
                        run = rawsize - dp
                    dst[dp : dp + run] = src[sp : sp + run]
                    dp += run
                    sp += run
                    ctrl >>= run
                    bit += run
    except IndexError as exc:
        raise ImageDecodeError("corrupt pglz data: truncated tag") from exc
    if check_complete and (dp != rawsize or sp != srcend):
        raise ImageDecodeError(
            f"corrupt pglz data: produced {dp} of {rawsize} bytes from {sp} of {srcend}"
        )
    return bytes(dst[:dp])


_TRAILING_ZEROS = tuple((n & -n).bit_length() - 1 if n else 8 for n in range(256))
