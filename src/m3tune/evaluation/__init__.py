"""Evaluation: the gold standard, retrieval models (dense, BM25, hybrid, API), IR metrics and reports."""
