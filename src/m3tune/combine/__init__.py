"""The `combine` step: all example sources into balanced, leakage-free train and validation sets."""
