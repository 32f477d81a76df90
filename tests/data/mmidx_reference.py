"""An independent reader of the MMIDIDX indexed format, written from the format description only (struct + bytes).

Format: ``.idx`` = magic ``b"MMIDIDX\\x00\\x00"``, uint64 version (1), uint8 dtype code (8 = uint16, 4 = int32, ...),
uint64 number of sequences N, uint64 document-index length M, then int32 sizes[N], int64 pointers[N] (byte
offsets in ``.bin``), int64 doc_idx[M]; all little-endian. ``.bin`` holds the tokens.
"""

import struct

CODES = {1: ("B", 1), 2: ("b", 1), 3: ("h", 2), 4: ("i", 4), 5: ("q", 8), 8: ("H", 2)}


def read_mmidx(prefix: str) -> dict:
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    assert idx[:9] == b"MMIDIDX\x00\x00", "bad magic"
    (version,) = struct.unpack_from("<Q", idx, 9)
    (code,) = struct.unpack_from("<B", idx, 17)
    n, m = struct.unpack_from("<QQ", idx, 18)
    off = 34
    sizes = list(struct.unpack_from(f"<{n}i", idx, off))
    off += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", idx, off))
    off += 8 * n
    doc_idx = list(struct.unpack_from(f"<{m}q", idx, off))
    off += 8 * m
    assert off == len(idx), "trailing bytes in .idx"
    fmt, width = CODES[code]
    seqs = [list(struct.unpack_from(f"<{s}{fmt}", data, p)) for s, p in zip(sizes, pointers)]
    docs = [sum(seqs[doc_idx[k]:doc_idx[k + 1]], []) for k in range(m - 1)]
    return {"version": version, "code": code, "width": width, "sizes": sizes, "pointers": pointers,
            "doc_idx": doc_idx, "sequences": seqs, "documents": docs, "bin_bytes": len(data)}
