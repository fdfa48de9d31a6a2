"""The measurement harness, kept apart from the steps it measures (`m3tune bench ...`).

quality         the end-to-end quality benchmark: the pipeline on a real corpus, fine-tuned vs BM25 on the gold
quality_tables  its held-out tables (held-out-test x independent, oracle, seed means)
gpu             throughput and MFU at BGE-M3 size on one CUDA device
train           training throughput against sentence-transformers' trainer, and its real Quran pairs

Nothing under m3tune's steps, pipeline or executors imports this package (tests/test_layers.py holds it).
"""
