"""The worker side of ``data_prep.pipeline``: parse, validate and split records, tokenize a batch.

A pool worker (or the main process when ``--workers 1``) is set up once by ``init_worker`` with the tokenizer and
the output-affecting options, then turns batches of records into per-split token arrays (``process_batch``). Kept
free of numpy and torch: workers start fast and stay small.
"""

from __future__ import annotations

import array
import hashlib
import json
from typing import Any

from pretrain.data.tokenizer import Tokenizer
from pretrain.data.writer import CODE_OF_NAME, CODES, token_dtype_name

SPLITS = ("train", "val", "test")
GROUP_SPLIT = {"val": "val", "test": "test"}
# Reasons a record is not written. All but ``filtered_set`` are input errors (fatal unless --on-error skip).
ERROR_REASONS = (
    "unreadable_file", "empty_file", "corrupt_compression", "too_long", "blank_line", "invalid_utf8",
    "invalid_json", "not_an_object", "missing_text", "text_not_string", "empty_text",
)
FILTER_REASON = "filtered_set"
NO_SET = "<none>"
UNKNOWN_SET = "<unparsed>"

_W: dict[str, Any] = {}


def set_parent_death_signal() -> None:
    """Linux: pool workers die with the main process even when it is SIGKILLed (no orphaned workers)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, other platforms
        pass


def init_worker(model_proto: bytes, options: dict, tok: Tokenizer | None = None) -> None:
    """Set up a pool worker from the tokenizer's bytes, or the main process (workers=1) with its tokenizer."""
    if tok is None:
        set_parent_death_signal()
        tok = Tokenizer(model_proto=model_proto)
    _W.clear()
    _W.update(options)
    _W["tok"] = tok
    _W["typecode"] = CODES[CODE_OF_NAME[token_dtype_name(tok.vocab_size)]][2]
    _W["set_path"] = options["set_key"].split(".") if options["set_key"] else []
    _W["include"] = set(options["include_sets"]) if options["include_sets"] else None
    _W["exclude"] = set(options["exclude_sets"] or ())
    _W["split_key"] = str(options["split_seed"]).encode()[:64]


def _set_name(obj: dict) -> str:
    if not _W["set_path"]:  # --set-key '': no subsets (the path would otherwise name the whole record)
        return NO_SET
    node: Any = obj
    for part in _W["set_path"]:
        if not isinstance(node, dict) or part not in node:
            return NO_SET
        node = node[part]
    if isinstance(node, (dict, list)) or node is None:  # not a name: one "subset" per distinct object otherwise
        return NO_SET
    return node if isinstance(node, str) else str(node)


def _split_of(group: str, text_bytes: bytes) -> int:
    forced = GROUP_SPLIT.get(group)
    if forced is not None:
        return SPLITS.index(forced)
    vf, tf = _W["val_fraction"], _W["test_fraction"]
    if vf <= 0 and tf <= 0:
        return 0
    h = hashlib.blake2b(text_bytes, digest_size=8, key=_W["split_key"]).digest()
    u = int.from_bytes(h, "little") / 2.0**64
    if u < vf:
        return 1
    if u < vf + tf:
        return 2
    return 0


def _check(rec: tuple) -> tuple:
    """→ ``(text, text_bytes, set_name, split)`` or ``(None, reason, set_name, message)``."""
    _source, _line, group, payload, reason, message = rec
    if reason is not None:
        return None, reason, UNKNOWN_SET, message
    if isinstance(payload, (bytes, bytearray)):
        if not payload or payload.isspace():  # isspace: no copy of the line, unlike strip
            return None, "blank_line", UNKNOWN_SET, "blank line"
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, "invalid_utf8", UNKNOWN_SET, f"invalid UTF-8 at byte {e.start} of the line"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the interpreter allows
            return None, "invalid_json", UNKNOWN_SET, f"invalid JSON: {e}"
    else:
        obj = payload
    if not isinstance(obj, dict):
        return None, "not_an_object", UNKNOWN_SET, f"JSON value is a {type(obj).__name__}, not an object"
    set_name = _set_name(obj)
    if (_W["include"] is not None and set_name not in _W["include"]) or set_name in _W["exclude"]:
        return None, FILTER_REASON, set_name, f"pile_set_name {set_name!r} filtered out"
    key = _W["text_key"]
    if key not in obj:
        return None, "missing_text", set_name, f"no {key!r} field"
    text = obj[key]
    if not isinstance(text, str):
        return None, "text_not_string", set_name, f"{key!r} is a {type(text).__name__}, not a string"
    try:
        text_bytes = text.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, "invalid_utf8", set_name, f"{key!r} contains an unpaired surrogate at character {e.start}"
    if not text or text.isspace():
        return None, "empty_text", set_name, f"{key!r} is empty or whitespace-only"
    if len(text_bytes) > _W["max_doc_bytes"]:
        return (None, "too_long", set_name,
                f"{key!r} holds {len(text_bytes)} bytes, more than --max-doc-bytes {_W['max_doc_bytes']}")
    return text, text_bytes, set_name, _split_of(group, text_bytes)


def process_batch(records: list[tuple]) -> dict:
    """Tokenize a batch. Returns per-record metadata and, per split, the concatenated tokens of written documents
    (an ``array.array`` in the shard's dtype) and their lengths."""
    tok: Tokenizer = _W["tok"]
    checked = [_check(r) for r in records]
    texts = [c[0] for c in checked if c[0] is not None]
    encoded = iter(tok.encode_batch(texts, num_threads=1) if texts else [])
    docs = []  # (split or -1, set_name, n_tokens, text_bytes, reason, message)
    tokens: dict[int, tuple[array.array, array.array]] = {}
    eod, bos, bos_len = tok.eod_id, tok.bos_id, int(_W["prepend_bos"])
    for c in checked:
        if c[0] is None:
            docs.append((-1, c[2], 0, 0, c[1], c[3]))
            continue
        ids = next(encoded)
        split = c[3]
        out = tokens.get(split)
        if out is None:
            out = tokens[split] = (array.array(_W["typecode"]), array.array("q"))
        flat, lengths = out
        if bos_len:
            flat.append(bos)
        flat.fromlist(ids)
        flat.append(eod)
        n = len(ids) + 1 + bos_len
        lengths.append(n)
        docs.append((split, c[2], n, len(c[1]), None, None))
    return {"docs": docs, "tokens": tokens}
