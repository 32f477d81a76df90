"""Data preparation: corpus reading, SentencePiece tokenizer training, and tokenization into indexed shards."""
