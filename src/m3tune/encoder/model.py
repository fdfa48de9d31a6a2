"""Encode texts with a Hugging Face encoder: BGE-M3's dense embedding by default.

BGE-M3's dense vector is the hidden state of the first token (CLS pooling),
L2-normalised; `pooling="mean"` serves encoders trained that way. Batches are
formed from texts sorted by length (less padding, the same result), run in
bf16/fp16 on a GPU and fp32 on CPU, and returned in the input order. On CPU
the model runs in ONNX Runtime, exported once per model (`onnxrt.py`: the same
fp32 computation with fused kernels); `runtime="torch"` keeps PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from m3tune.encoder.profiles import Dtype, Pooling, profile_of, resolve
from m3tune.errors import BadInput, ConfigError, UserError

log = logging.getLogger("m3tune.encoder")

Runtime = Literal["auto", "torch", "onnx"]


def pool(hidden, attention_mask, pooling: Pooling):
    """The dense vector before normalisation: the first token's hidden state (CLS: BGE-M3), or the mean of
    the unpadded tokens' (mean: e5). The encoder, the training loss and the BGE-M3 heads' evaluation all
    pool through this one function, so they cannot drift apart."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def load_config(model: str, path: str):
    """MODEL's transformers config from PATH; its config.json refused in one line when transformers cannot
    read it (an unknown model_type, an auto_map naming code that would need trust_remote_code)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None
    except (ValueError, KeyError, TypeError) as e:  # what transformers raises for a config it does not know
        where = f"{path}/config.json" if Path(path).is_dir() else f"model {model!r}"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{where}: not a config transformers can load without running the folder's own code: "
                       f"{first}") from None


def positions(config) -> int | None:
    """Tokens MODEL can read: its table of positions, less RoBERTa's offset (its positions start after the
    padding id, so XLM-R's 514 entries read 512 tokens); None when the model has no such table."""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    if "roberta" in str(getattr(config, "model_type", "")) or str(getattr(config, "model_type", "")) == "camembert":
        n -= int(getattr(config, "pad_token_id", None) or 1) + 1
    return n


def check_max_length(model: str, config, max_length: int, option: str = "--max-length") -> None:
    """Refuse a max_length beyond the model's positions: PyTorch fails at the first long text (an IndexError
    deep in the forward pass) and ONNX Runtime reads past the table: found now, in the option's words."""
    n = positions(config)
    if n is not None and max_length > n:
        field = option.lstrip("-").replace("-", "_")
        raise ConfigError(f"{field} {max_length}: model {model!r} reads at most {n} tokens "
                          f"(max_position_embeddings {config.max_position_embeddings}); set {option} "
                          f"({field}) to {n} or less")


class Encoder:
    """A dense encoder with its profile (pooling, prompts, length: `m3tune.encoder.profiles`); the
    keyword arguments left None take the model's profile."""

    def __init__(self, model: str, *, pooling: Pooling | None = None, query_prompt: str | None = None,
                 passage_prompt: str | None = None, max_length: int | None = None, batch_size: int = 32,
                 device: str | None = None, dtype: str = "auto", strip_marks: bool | None = None,
                 runtime: Runtime = "auto"):
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        from m3tune.encoder import onnxrt

        hf_logging.disable_progress_bar()  # our own progress bars and logs say what is happening
        hf_logging.set_verbosity_error()
        path = resolve(model)
        if not Path(path).exists() and ("/" not in path or path.startswith((".", "/"))):
            raise UserError(f"model {model!r}: no such folder, and not a hub id (namespace/name)")
        self.profile = profile_of(model, pooling=pooling,
                                  query_prompt=query_prompt, passage_prompt=passage_prompt, max_length=max_length,
                                  strip_marks=strip_marks)
        self.name, self.batch_size = model, batch_size
        self.pooling, self.max_length = self.profile.pooling, self.profile.max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype not in get_args(Dtype):
            raise UserError(f"encoder dtype {dtype!r}: expected one of {', '.join(get_args(Dtype))}")
        # int8: the fp32 model's ONNX export with its matrix products quantized (onnxrt.quantize), CPU only
        int8 = dtype == "int8"
        torch_dtype = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                       "int8": torch.float32}[dtype]
        if torch_dtype is None:
            torch_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
                if self.device.startswith("cuda") else torch.float32
        self._path = path
        if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
            raise UserError(f"model {model!r}: {path} has no config.json: not a Hugging Face model folder")
        if runtime not in ("auto", "torch", "onnx"):
            raise UserError(f"encoder runtime {runtime!r}: expected auto, torch or onnx")
        config = load_config(model, path)
        check_max_length(model, config, self.max_length)
        on_cpu_fp32 = self.device == "cpu" and torch_dtype == torch.float32
        if int8 and (runtime == "torch" or self.device != "cpu" or not onnxrt.supported(config)):
            raise UserError(f"encoder dtype int8: model {model!r} ({config.model_type}) on {self.device} with runtime "
                            f"{runtime}: int8 runs through ONNX Runtime on CPU only ({'/'.join(onnxrt.MODEL_TYPES)} "
                            "under 2 GB in fp32)")
        if runtime == "onnx" and not (on_cpu_fp32 and onnxrt.supported(config)):
            raise UserError(f"encoder runtime onnx: model {model!r} ({config.model_type}) on {self.device} "
                            f"in {dtype} is not exported (fp32 on CPU, {'/'.join(onnxrt.MODEL_TYPES)} under 2 GB)")
        try:
            self._tokenizer, self._rust = _tokenizers(path)
        except OSError as e:
            raise UserError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None
        self.pad_id = int(config.pad_token_id or 0)
        self.dim = int(config.hidden_size)
        # what the text goes through before tokenizing (the tiny model's fingerprint from before profiles
        # existed is the one with neither prompts nor marks stripped)
        prep = [self.profile.query_prompt, self.profile.passage_prompt] + (["strip_marks"] if self.profile.strip_marks else [])
        self.fingerprint = _fingerprint(model, path, self.pooling, self.max_length,
                                        json.dumps(prep) if any(prep) else None,
                                        getattr(config, "_commit_hash", None), int8=int8)
        if (runtime == "onnx" or int8) and not onnxrt.installed():
            raise UserError(f"encoder {'dtype int8' if int8 else 'runtime onnx'}: onnxruntime and onnx are not "
                            "installed (pip install 'm3tune[encode]')")
        # auto: ONNX Runtime on CPU wherever the model exports (onnxrt.py says why), PyTorch elsewhere
        self.runtime = "onnx" if runtime == "onnx" or int8 or (runtime == "auto" and on_cpu_fp32 and onnxrt.supported(config)
                                                       and onnxrt.installed()) else "torch"
        self.model = self._session = None
        try:
            if self.runtime == "onnx":  # the PyTorch model is never loaded: its weights would double the memory
                # cached under the weights' own fingerprint: pooling, prompts and length do not change the graph
                weights = _fingerprint(model, path, "", 0, None, getattr(config, "_commit_hash", None))
                self._session = onnxrt.load(path, weights, torch.get_num_threads(), int8=int8)
            else:
                self.model = AutoModel.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        except OSError as e:
            raise UserError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None

    def settings(self) -> dict:
        """What the vectors depend on besides the weights: recorded in index.json and manifests."""
        return {"pooling": self.pooling, "query_prompt": self.profile.query_prompt,
                "passage_prompt": self.profile.passage_prompt, "max_length": self.max_length,
                "strip_marks": self.profile.strip_marks}

    @property
    def notice(self) -> str | None:
        """The model folder's NOTICE.md (the attribution its licence asks for), if it has one."""
        file = Path(self._path) / "NOTICE.md"
        return file.read_text(encoding="utf-8") if file.is_file() else None

    @property
    def tokenizer(self):
        """The transformers tokenizer (encoding goes through its Rust tokenizer)."""
        return self._tokenizer

    def encode(self, texts: Sequence[str], *, queries: bool = False, desc: str = "encode") -> np.ndarray:
        """L2-normalised float32 vectors of TEXTS, in order, each after its prompt (query or passage)."""
        import torch

        from m3tune.progress import track

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Texts sorted by length, then tokenized a block at a time and re-sorted by token count inside
        # the block: batches of near-equal token length waste little compute on padding. Blocks stay
        # small because the tokenizer keeps each truncated text's overflow tokens until the block is done.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        block = self.batch_size * 8

        def batches():
            for start in range(0, len(order), block):
                chunk = order[start:start + block]
                for batch, ids, mask in self._batches([self.profile.prepare(texts[i], queries=queries)
                                                       for i in chunk]):
                    yield [chunk[j] for j in batch], ids, mask

        with torch.inference_mode():
            for rows, ids, mask in track(batches(), description=desc, total=-(-len(texts) // self.batch_size)):
                mask_t = torch.from_numpy(mask).to(self.device)
                if self._session is not None:  # ONNX Runtime's hidden states, pooled as PyTorch's below
                    hidden = torch.from_numpy(self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0])
                else:
                    hidden = self.model(input_ids=torch.from_numpy(ids).to(self.device),
                                        attention_mask=mask_t).last_hidden_state
                out[rows] = torch.nn.functional.normalize(pool(hidden, mask_t, self.pooling).float(),
                                                          dim=-1).cpu().numpy()
        return out

    def _batches(self, texts: list[str]):
        """(positions in TEXTS, padded input ids, attention mask) per batch, shortest first."""
        if self._rust is not None:
            # The Rust tokenizer straight from tokenizer.json: one parallel call for the block, and
            # numpy arrays built from its ids (transformers' per-batch tensor conversion from Python
            # lists cost ~10% of encoding a corpus with a small model). The truncation is set on each call:
            # this tokenizer is the transformers tokenizer's own, which sets its own when called.
            self._rust.no_padding()
            self._rust.enable_truncation(self.max_length)
            seqs = [e.ids for e in self._rust.encode_batch(texts)]
        else:
            seqs = self._tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        by_len = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for b in range(0, len(by_len), self.batch_size):
            batch = by_len[b:b + self.batch_size]
            yield (batch, *pad([seqs[i] for i in batch], self.pad_id))


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, attention mask) of token id sequences, right-padded to the longest."""
    width = max((len(s) for s in seqs), default=0)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return ids, mask


class FastTokenize:
    """`tokenize(texts, max_length)` -> {input_ids, attention_mask} tensors, as a transformers tokenizer's
    `(texts, padding=True, truncation=True, return_tensors="pt")` gives them, but through the Rust tokenizer
    behind it and numpy padding: for a small model, transformers' per-batch tensor conversion from Python
    lists was a measurable share of a training step. The Rust tokenizer is the one the transformers
    tokenizer already holds (a second copy of XLM-R's vocabulary costs ~300 MB to load); its truncation is
    set per call under a lock, so every tokenization of the training loop must come through here."""

    def __init__(self, tokenizer):
        import threading

        self.tokenizer = tokenizer
        self.rust = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.lock = threading.Lock()

    def __call__(self, texts: list[str], max_length: int) -> dict:
        import torch

        with self.lock:
            if self.rust is None:
                return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                                           return_tensors="pt"))
            self.rust.no_padding()
            self.rust.enable_truncation(max_length)
            seqs = [e.ids for e in self.rust.encode_batch(texts)]
        ids, mask = pad(seqs, self.pad_id)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict:
    """Padded, truncated token tensors of TEXTS through a FastTokenize or a plain transformers tokenizer."""
    if isinstance(tokenizer, FastTokenize):
        return tokenizer(texts, max_length)
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def _tokenizers(path: str):
    """(the transformers tokenizer, its Rust tokenizer, or None for a slow one). The Rust tokenizer is the one
    AutoTokenizer builds, not tokenizer.json read on its own: transformers 5 rebuilds XLM-R's pipeline
    (WhitespaceSplit before Metaspace), so the file alone turns a trailing space or U+200F into a final `▁`
    token that training, sentence-transformers and every transformers user never see (cosine 0.98 on
    'patience ' against 'patience'). It is used in place, not copied: a second copy of XLM-R's vocabulary
    raised the peak memory of encoding with e5-small by ~300 MB."""
    from transformers import AutoTokenizer

    try:
        auto = AutoTokenizer.from_pretrained(path)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 — a corrupt tokenizer file surfaces as whatever its parser raises
        where = Path(path) / "tokenizer.json" if Path(path).is_dir() else path
        raise UserError(f"{where}: not a tokenizer file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    return auto, (auto.backend_tokenizer if getattr(auto, "is_fast", False) else None)


_LOADED: dict[tuple, Encoder] = {}


def load_encoder(model: str, *, pooling: Pooling | None = None, query_prompt: str | None = None,
                 passage_prompt: str | None = None, max_length: int | None = None, batch_size: int = 32,
                 dtype: str = "auto", strip_marks: bool | None = None, runtime: Runtime = "auto") -> Encoder:
    """An Encoder, loaded once per process for the same settings: `index` and `mine-negatives` in one
    `m3tune run` share it (loading XLM-R's tokenizer alone takes ~2 s). RUNTIME "torch": the PyTorch model
    itself is needed (BGE-M3's heads run on its hidden states)."""
    # keyed by the settings as the profile resolves them: the index step passes its config's (None: the
    # profile's), mine-negatives the resolved ones index.json records; keyed on the raw arguments, one `m3tune
    # run` loaded the same model twice (e5-small: +1 GB peak memory and a second load)
    resolved = profile_of(model, pooling=pooling, query_prompt=query_prompt, passage_prompt=passage_prompt,
                          max_length=max_length, strip_marks=strip_marks)
    key = (model, resolved, batch_size, dtype, runtime)
    if key not in _LOADED:
        _LOADED[key] = Encoder(model, pooling=pooling, query_prompt=query_prompt, passage_prompt=passage_prompt,
                               max_length=max_length, batch_size=batch_size, dtype=dtype, strip_marks=strip_marks,
                               runtime=runtime)
    return _LOADED[key]


def _fingerprint(model: str, path: str, pooling: str, max_length: int, instruction: str | None,
                 revision: str | None, *, int8: bool = False) -> str:
    """Identifies what the vectors depend on: a hub model's revision, or a local folder's files.

    For a local folder: the config and tokenizer files whole, and for each
    weight file its size and its first and last MiB (the safetensors header,
    the first and the last tensors): retrained weights saved over the folder
    change it, without hashing gigabytes on every load. No modification time:
    the same model built or downloaded in two pods (index and mine-negatives
    on Argo) must have the same fingerprint.
    """
    # "tokenizer": texts go through AutoTokenizer's Rust pipeline (vectors cached before that differ on a
    # trailing space, so they must not be found under the same fingerprint)
    parts: dict = {"model": model, "pooling": pooling, "max_length": max_length, "instruction": instruction,
                   "revision": revision, "tokenizer": "transformers-auto"}
    if int8:  # int8 vectors differ from the fp32 ones: never found in the cache under their fingerprint
        parts["precision"] = "int8"
    folder = Path(path)
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt"):
                size = f.stat().st_size
                with open(f, "rb") as weights:
                    digest = hashlib.sha256(weights.read(1 << 20))
                    weights.seek(max(0, size - (1 << 20)))
                    digest.update(weights.read(1 << 20))
                parts[f.name] = [size, digest.hexdigest()]
            elif f.suffix == ".json":
                parts[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
