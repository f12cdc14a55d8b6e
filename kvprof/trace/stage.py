"""Format version 2 on disk, the writing side: staging records and chunks, with struct alone
(a recorded process never imports numpy).  The reading side is kvprof/trace/codec.py.


Staging (``stage-NNNNNN.kvs``).  A recorded process appends every record to a
memory-mapped segment file (MAP_SHARED, its space reserved up front with
``posix_fallocate``), so a record is in the kernel's page cache the moment the call
that made it returns: a process killed by any signal, ``os._exit`` or a crash in
native code loses nothing it had recorded.  Records are 48 bytes; the last byte is a
tag naming what the record holds, and 0 in space never written, so the valid records
of a segment are the prefix before the first 0 tag.  Each entry (a block event with
its continuation records of ids, a heap snapshot in two halves) is appended by one
``mmap.write`` call, which holds the GIL throughout: entries of concurrent threads
and of signal handlers never interleave.  An entry cut short by the process dying in
the middle of that copy is detected (a block event without all its continuations)
and dropped.

Chunks (``events.kvc``).  Full segments are compressed by the process's writer
thread, one chunk each, appended with one ``write``: a 40-byte header (below, with a
CRC of itself and of the payload) and the segment's valid records, byte-shuffled
(byte 0 of every record, then byte 1, ...) and zlib-compressed.  A chunk says which
staging segment it holds (number and record count), so a segment found beside its
chunk (the process died between the two) is not read twice; the reader takes the
segments in their order, from the chunk log or from their files.  Heap-site rows of a
tracemalloc snapshot are written as a chunk of their own.  A chunk with a damaged
payload is skipped; a damaged header ends the chunk log for the reader (what the
staging files hold is still read).
"""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mmap

PROCESS_FORMAT = "stage+chunks"  # process.json's "format": this layout (staging segments, a chunk log)
RECORD = 48  # bytes per staging record
IDS_INLINE = 3  # block ids carried by the event record itself
IDS_PER_CONT = 11  # block ids per continuation record
HEAP_SITE_BYTES = 24  # HEAP_SITE_DTYPE's itemsize

# tags (the last byte of a staging record)
TAG_BLOCK, TAG_IDS, TAG_MARK, TAG_GC, TAG_HEAP_A, TAG_HEAP_B, TAG_STRING, TAG_STRING_CONT = 1, 2, 3, 4, 5, 6, 7, 8
MAX_TAG = TAG_STRING_CONT
STRING_INLINE, STRING_PER_CONT = 41, 47  # UTF-8 bytes of an interned string in its first record, in each one after

BLOCK_REC = struct.Struct("<qBHiqqIiiiB")  # t kind pool req arg arg2 n id0 id1 id2 tag
IDS_REC = struct.Struct("<11i3xB")
MARK_REC = struct.Struct("<qiq27xB")
GC_REC = struct.Struct("<qqBqq14xB")
HEAP_REC = struct.Struct(
    "<qIBiqq14xBqqqqIq3xB"
)  # two records: t seq reason mark mark_value live | blocks traced peak overhead rows cost
STRING_REC = struct.Struct("<iH41sB")  # an interned request id: its number, its UTF-8 length, the first 41 bytes
# a block event with k <= IDS_INLINE ids: (t, kind, pool, req, arg, arg2, k, *ids, TAG_BLOCK)
PACK_N = [struct.Struct("<qBHiqqI" + "i" * k + "x" * (4 * (IDS_INLINE - k)) + "B") for k in range(IDS_INLINE + 1)]
assert (
    all(s.size == RECORD for s in (BLOCK_REC, IDS_REC, MARK_REC, GC_REC, STRING_REC, *PACK_N))
    and HEAP_REC.size == 2 * RECORD
)

CHUNKS = "events.kvc"  # one chunk log per process
STAGE_PREFIX, STAGE_SUFFIX = "stage-", ".kvs"
PAYLOAD_RECORDS, PAYLOAD_HEAP_SITES = 1, 2  # staging records; HEAP_SITE_DTYPE rows
WIDTH = {PAYLOAD_RECORDS: RECORD, PAYLOAD_HEAP_SITES: HEAP_SITE_BYTES}
MAGIC = b"KVC2"
# magic payload tags-bitmask pad nrec raw_len comp_len seg_seq seg_count crc | hcrc
HEADER = struct.Struct("<4sBBHIIIqII")
HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = HEADER.size + HEADER_CRC.size
assert HEADER_SIZE == 40
MAX_CHUNK_RAW = 1 << 28  # a chunk header claiming more is corrupt (the writer's are a few MB)


class ChunkError(ValueError):
    """A chunk that cannot be trusted: the chunk log ends there for the reader."""


def stage_name(seq: int) -> str:
    return f"{STAGE_PREFIX}{seq:06d}{STAGE_SUFFIX}"


def pack_block(t: int, kind: int, pool: int, req: int, arg: int, arg2: int, ids: list[int] | tuple[int, ...]) -> bytes:
    """The staging entry of one block event: the event record and its continuations."""
    n = len(ids)
    if n <= IDS_INLINE:
        return PACK_N[n].pack(t, kind, pool, req, arg, arg2, n, *ids, TAG_BLOCK)
    ids = list(ids)
    head = BLOCK_REC.pack(t, kind, pool, req, arg, arg2, n, ids[0], ids[1], ids[2], TAG_BLOCK)
    rest = ids[IDS_INLINE:]
    pad = (-len(rest)) % IDS_PER_CONT
    if pad:
        rest.extend((0,) * pad)
    return head + b"".join(
        IDS_REC.pack(*rest[i : i + IDS_PER_CONT], TAG_IDS) for i in range(0, len(rest), IDS_PER_CONT)
    )


def pack_string(sid: int, text: str) -> bytes:
    """The staging entry of an interned request id (its record, then continuation records
    of 47 bytes each); at most 65,535 bytes of UTF-8 are kept."""
    data = text.encode("utf-8", "surrogatepass")[:65535]
    head = STRING_REC.pack(sid, len(data), data[:STRING_INLINE], TAG_STRING)
    rest = data[STRING_INLINE:]
    if not rest:
        return head
    parts = [head]
    for i in range(0, len(rest), STRING_PER_CONT):
        piece = rest[i : i + STRING_PER_CONT]
        parts.append(piece + bytes(STRING_PER_CONT - len(piece)) + bytes((TAG_STRING_CONT,)))
    return b"".join(parts)


def written_records(buf: bytes | bytearray | memoryview | mmap.mmap) -> int:
    """Records a segment holds: those before the first never-written one (tag 0)."""
    tags = bytes(buf[RECORD - 1 :: RECORD])
    end = tags.find(0)
    return len(tags) if end < 0 else end


def shuffle(raw: bytes, width: int) -> bytes:
    """Byte planes: byte 0 of every record, then byte 1, ...  Records of one kind differ in
    few bytes, so the planes compress far better than the rows (3.3 bytes per block event
    with zlib level 1, against 8 for the rows)."""
    return b"".join(raw[i::width] for i in range(width))


def encode_chunk(payload: int, raw: bytes, seg: tuple[int, int] = (-1, 0), level: int = 1) -> bytes:
    """One chunk of ``raw`` (whole records of ``payload``'s width); ``seg``: the staging
    segment and the number of its records this chunk holds (-1: written directly)."""
    width = WIDTH[payload]
    body = zlib.compress(shuffle(raw, width), level)
    tags = raw[RECORD - 1 :: RECORD] if payload == PAYLOAD_RECORDS else b""
    return chunk_from_body(payload, body, len(raw) // width, len(raw), seg, tags)


def chunk_from_body(
    payload: int, body: bytes, nrec: int, raw_len: int, seg: tuple[int, int], tags: bytes = b""
) -> bytes:
    """A chunk around an already compressed body (of the byte planes); ``tags``: the
    records' tag bytes, for the header's bitmask of the tags present."""
    mask = 0
    for t in set(tags):
        if 0 < t < 8:  # the bitmask is one byte: tags 1 to 7 (8 only follows a 7)
            mask |= 1 << t
    head = HEADER.pack(MAGIC, payload, mask, 0, nrec, raw_len, len(body), seg[0], seg[1], zlib.crc32(body))
    return head + HEADER_CRC.pack(zlib.crc32(head)) + body


class ChunkHeader:
    __slots__ = ("payload", "tags", "nrec", "raw_len", "comp_len", "seg_seq", "seg_count", "crc")

    def __init__(self, data: bytes):
        if len(data) < HEADER_SIZE:
            raise ChunkError("cut short")
        fields = HEADER.unpack_from(data)
        (hcrc,) = HEADER_CRC.unpack_from(data, HEADER.size)
        if fields[0] != MAGIC or zlib.crc32(data[: HEADER.size]) != hcrc:
            raise ChunkError("bad chunk header")
        (
            _,
            self.payload,
            self.tags,
            _,
            self.nrec,
            self.raw_len,
            self.comp_len,
            self.seg_seq,
            self.seg_count,
            self.crc,
        ) = fields
        width = WIDTH.get(self.payload)
        if width is None:
            raise ChunkError(f"unknown chunk payload {self.payload}")
        if self.raw_len > MAX_CHUNK_RAW or self.raw_len != self.nrec * width or self.comp_len > MAX_CHUNK_RAW:
            raise ChunkError("chunk sizes do not add up")

    def has(self, tag: int) -> bool:
        return bool(self.tags >> tag & 1)
