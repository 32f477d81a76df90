"""Training data: reading packed token shards (NeoX/Megatron ``MMIDIDX`` format) as resumable sequences.

Needs only numpy and torch (no sentencepiece); the shards are produced by ``data_prep/tokenize_pile.py``.
``pretrain.data.writer`` (format constants and writer) needs the standard library only, ``pretrain.data.indexed``
(reader) numpy, ``pretrain.data.packed`` torch; names are loaded on first use, so that importing the writer costs
neither numpy nor torch.
"""

_INDEXED = ("IndexFormatError", "IndexedDataset", "IndexedDatasetWriter", "merge_indexed", "token_dtype")
_PACKED = ("FeistelPermutation", "PackedSequenceDataset", "TokenStream", "resolve_shards")


def __getattr__(name):
    if name in _INDEXED:
        from . import indexed

        return getattr(indexed, name)
    if name in _PACKED:
        from . import packed

        return getattr(packed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IndexFormatError",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "merge_indexed",
    "token_dtype",
    *_PACKED,
]
