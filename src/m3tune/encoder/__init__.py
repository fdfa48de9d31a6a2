"""Encoders: any Hugging Face encoder (BGE-M3 by default) and the tiny local XLM-RoBERTa for offline runs."""
