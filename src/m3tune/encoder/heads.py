"""BGE-M3's two extra heads, for unified training: sparse (lexical) and multi-vector (ColBERT).

BGE-M3 (Chen et al., 2024; FlagEmbedding's `EncoderOnlyEmbedderM3Model`) reads three retrievers off one
encoder's last hidden states h:

- dense: the pooled vector (CLS for BGE-M3), L2-normalised;
- sparse: a weight `ReLU(sparse_linear(h_t))` per token, max-pooled per token id; the special ids
  (CLS, EOS, PAD, UNK, as BGE-M3 leaves them out) weigh nothing;
- multi-vector: `normalize(colbert_linear(h_t))` for each token after CLS.

The heads are two `torch.nn.Linear`s: `sparse_linear` (hidden -> 1) and `colbert_linear` (hidden -> hidden),
stored beside the HF weights as `sparse_linear.pt` and `colbert_linear.pt`, plain state dicts of tensors
(FlagEmbedding loads them with `torch.load(weights_only=True)`). A base model that has them (BGE-M3) lends
them; one that has not (e5-small, the tiny model) gets fresh ones, initialised as `torch.nn.Linear` does
(Kaiming-uniform) from a generator seeded with the run's seed, so two runs start from the same heads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch  # this module is imported only where a model is trained or scored

from m3tune.errors import BadInput, ConfigError

SPARSE_FILE, COLBERT_FILE = "sparse_linear.pt", "colbert_linear.pt"
VOCAB_FILE = "m3tune_heads.json"  # the vocabulary the heads were trained with (written by m3tune's export)


def special_ids(tokenizer) -> list[int]:
    """The ids the sparse head gives no weight: CLS, EOS, PAD and UNK, as BGE-M3 (FlagEmbedding's
    `_sparse_embedding` and `_process_token_weights`) leaves them out."""
    ids = []
    for name in ("cls_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            ids.append(int(tokenizer.convert_tokens_to_ids(token)))
    return sorted(set(ids))


def vocabulary_digest(tokenizer) -> str:
    """sha256 of the tokenizer's (piece, id) pairs: the sparse head's weights are per token id, so they mean
    something only with the vocabulary they were trained with."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return "sha256:" + hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def check_vocabulary(tokenizer, *, embedding_rows: int, folder: str | None, model: str) -> None:
    """Refuse, before training, a tokenizer the sparse head cannot serve: ids past the embedding matrix, no
    special tokens to leave out, or another vocabulary than the one FOLDER's heads were trained with."""
    if len(tokenizer) > embedding_rows:
        raise ConfigError(f"train: unified: the tokenizer of {model} has {len(tokenizer)} ids but the encoder's "
                          f"embedding has {embedding_rows} rows: the tokenizer does not belong to this encoder")
    missing = [n for n in ("cls_token", "eos_token", "pad_token", "unk_token") if getattr(tokenizer, n, None) is None]
    if missing:
        raise ConfigError(f"train: unified: the tokenizer of {model} has no {', '.join(missing)}; the sparse head "
                          "leaves the special tokens out by id, as BGE-M3 does")
    record = Path(folder) / VOCAB_FILE if folder else None
    if record is not None and record.is_file():
        try:
            wanted = json.loads(record.read_text(encoding="utf-8"))["vocabulary"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{record}: not a valid heads record ({e})") from None
        if wanted != vocabulary_digest(tokenizer):
            raise ConfigError(f"train: unified: {record} says the sparse and ColBERT heads were trained with "
                              f"another vocabulary ({wanted}) than the tokenizer of {model} "
                              f"({vocabulary_digest(tokenizer)}); their weights per token id would be meaningless")


def _read_head(path: Path, *, shapes: dict[str, tuple[int, ...]]):
    """The state dict in PATH, checked against SHAPES; a clear error naming the file otherwise."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise BadInput(f"{path}: not a torch state dict of tensors ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or set(state) != set(shapes) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"{path}: expected the tensors {sorted(shapes)} of a torch.nn.Linear, found "
                       f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise BadInput(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {shape} for an encoder "
                           f"of hidden size {shapes['weight'][1]} (heads of another model width?)")
    return state


def load_or_create(folder: str | None, hidden: int, *, seed: int):
    """(sparse_linear, colbert_linear, "loaded" or "fresh"): FOLDER's heads when it has them, else new ones
    from a generator seeded with SEED (the global RNG is left as it was)."""
    sparse, colbert = torch.nn.Linear(hidden, 1), torch.nn.Linear(hidden, hidden)
    files = [Path(folder) / name for name in (SPARSE_FILE, COLBERT_FILE)] if folder else []
    present = [f for f in files if f.is_file()]
    if present and len(present) < 2:
        missing = next(f for f in files if not f.is_file())
        raise BadInput(f"{present[0]} is there but {missing} is not: BGE-M3's heads come as a pair")
    if present:
        sparse.load_state_dict(_read_head(files[0], shapes={"weight": (1, hidden), "bias": (1,)}))
        colbert.load_state_dict(_read_head(files[1], shapes={"weight": (hidden, hidden), "bias": (hidden,)}))
        return sparse, colbert, "loaded"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sparse.reset_parameters()
        colbert.reset_parameters()
    return sparse, colbert, "fresh"


class Output:
    """What UnifiedModel returns: the encoder's last hidden states, each token's sparse weight (N, L) and
    each token's multi-vector after CLS (N, L-1, H), not normalised."""

    def __init__(self, last_hidden_state, sparse, colbert):
        self.last_hidden_state, self.sparse, self.colbert = last_hidden_state, sparse, colbert


class UnifiedModel(torch.nn.Module):
    """The encoder and both heads as one torch module: DDP, DeepSpeed, the optimizer and Accelerate's
    checkpoints see every trained parameter; `save_pretrained` writes the BGE-M3 folder layout. VOCABULARY
    (vocabulary_digest) is recorded beside the heads."""

    def __init__(self, encoder, sparse_linear, colbert_linear, *, vocabulary: str | None = None):
        super().__init__()
        self.encoder, self.sparse_linear, self.colbert_linear = encoder, sparse_linear, colbert_linear
        self.vocabulary = vocabulary

    @property
    def config(self):
        return self.encoder.config

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def gradient_checkpointing_enable(self, **kw):
        self.encoder.gradient_checkpointing_enable(**kw)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sparse = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
        return Output(hidden, sparse, self.colbert_linear(hidden[:, 1:]))

    def save_pretrained(self, folder, state_dict=None, **kw):
        """The HF encoder (its own keys) plus sparse_linear.pt and colbert_linear.pt as plain state dicts of
        tensors (loadable with weights_only=True), and the vocabulary they were trained with."""
        state = state_dict if state_dict is not None else self.state_dict()
        folder = Path(folder)
        self.encoder.save_pretrained(folder, state_dict={k[len("encoder."):]: v for k, v in state.items()
                                                         if k.startswith("encoder.")}, **kw)
        for prefix, name in (("sparse_linear.", SPARSE_FILE), ("colbert_linear.", COLBERT_FILE)):
            torch.save({k[len(prefix):]: v.detach().cpu().clone().contiguous() for k, v in state.items()
                        if k.startswith(prefix)}, folder / name)
        if self.vocabulary:
            (folder / VOCAB_FILE).write_text(json.dumps({"vocabulary": self.vocabulary}) + "\n")


def locate(path: str) -> str | None:
    """The folder holding PATH's heads: PATH itself when it is a folder, else the hub cache's copy of a hub
    model's two head files (None when it has none, or without network: the heads are then fresh)."""
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import hf_hub_download

        files = [Path(hf_hub_download(path, name)) for name in (SPARSE_FILE, COLBERT_FILE)]
    except Exception:  # noqa: BLE001 — absent from the repository, or no network: fresh heads
        return None
    return str(files[0].parent) if files[0].parent == files[1].parent else None
