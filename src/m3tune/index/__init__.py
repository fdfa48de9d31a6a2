"""Vector search over the corpus: exact (matrix product) or Qdrant (local mode or a server)."""
