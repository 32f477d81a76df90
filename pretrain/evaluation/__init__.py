"""Evaluation: perplexity and bits per byte of trained models on held-out data."""

from pretrain.evaluation.scoring import Document, Totals, score_documents, totals_by_set, windows

__all__ = ["Document", "Totals", "score_documents", "totals_by_set", "windows"]
