"""The model folder: transformers weights and tokenizer, sentence-transformers modules (the base model's
pooling, then normalisation; its query / document prompts), BGE-M3's sparse/ColBERT heads copied when the
base has them, a model card and curves.

The sentence-transformers files are written here as JSON, not by
sentence-transformers itself: it is not a training dependency, and the
layout is four small documented files (the tests load the folder with it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

BGE_M3_HEADS = ("sparse_linear.pt", "colbert_linear.pt")
PROFILE_FILE = "m3tune_profile.json"
CURVES = "validation_curves.png"


def write_sentence_transformers_files(folder: Path, *, hidden: int, max_seq_length: int, profile) -> None:
    """The sentence-transformers files of PROFILE: `encode_query` / `encode_document` then give m3tune's
    vectors (prompts named `query` and `document`, as sentence-transformers names them; the prompt's tokens
    are pooled too, as m3tune's Encoder pools them), and m3tune reads the profile back from them."""
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2) + "\n")
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2) + "\n")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": profile.pooling == "cls",
        "pooling_mode_mean_tokens": profile.pooling == "mean",
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True,
    }, indent=2) + "\n")
    (folder / "2_Normalize").mkdir(exist_ok=True)
    # The whole profile, for m3tune (sentence-transformers has no place for stripping marks): index and
    # evaluate then treat the fine-tuned model exactly as it was trained.
    (folder / PROFILE_FILE).write_text(json.dumps({**asdict(profile), "max_length": max_seq_length,
                                                   "heads": list(profile.heads)}, indent=2) + "\n")
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": profile.query_prompt, "document": profile.passage_prompt}, "default_prompt_name": None,
         "similarity_fn_name": "cosine"}, indent=2) + "\n")


def copy_notice(base: str, folder: Path) -> bool:
    """The base model folder's NOTICE.md (its licence's attribution) travels with the fine-tuned model."""
    source = Path(base) / "NOTICE.md"
    if source.is_file():
        shutil.copyfile(source, folder / "NOTICE.md")
        return True
    return False


def copy_bge_m3_heads(base: str, folder: Path) -> list[str]:
    """Copy BGE-M3's sparse and ColBERT heads from the base model (a folder, or the hub cache) when present."""
    copied = []
    for name in BGE_M3_HEADS:
        source = Path(base) / name
        if not source.is_file() and not Path(base).exists():
            try:
                from huggingface_hub import hf_hub_download

                source = Path(hf_hub_download(base, name))
            except Exception:  # absent from the repository, or no network: nothing to copy
                continue
        if source.is_file():
            shutil.copyfile(source, folder / name)
            copied.append(name)
    return copied


def plot_curves(history: list[dict[str, Any]], dims: list[int], out: Path,
                before: dict[str, Any] | None = None) -> None:
    """Four panels: training loss, validation nDCG@10 per dim, gradient norm (before clipping), throughput."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt

    train = [h for h in history if h.get("kind") == "train"]
    evals = ([{"step": 0, "metrics": before}] if before else []) + [h for h in history if h.get("kind") == "validation"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (loss_ax, val_ax), (norm_ax, speed_ax) = axes
    if train:
        loss_ax.plot([h["step"] for h in train], [h["loss"] for h in train], lw=1)
    loss_ax.set(title="training loss (Matryoshka InfoNCE)", xlabel="optimizer step", ylabel="loss")
    for dim in dims:
        pts = [(h["step"], h["metrics"][str(dim)]["ndcg@10"]) for h in evals]
        if pts:
            val_ax.plot(*zip(*pts), marker="o", label=f"{dim} dims")
    val_ax.set(title="validation nDCG@10 (step 0: before training)", xlabel="optimizer step", ylabel="nDCG@10")
    val_ax.legend()
    norms = [(h["step"], h["grad_norm"]) for h in train if h.get("grad_norm") is not None]
    if norms:
        norm_ax.plot(*zip(*norms), lw=1)
    norm_ax.set(title="gradient norm before clipping", xlabel="optimizer step", ylabel="L2 norm")
    if train:
        speed_ax.plot([h["step"] for h in train], [h.get("examples_per_s", 0) for h in train], lw=1,
                      color="tab:blue")
        tokens_ax = speed_ax.twinx()
        tokens_ax.plot([h["step"] for h in train], [h.get("tokens_per_s", 0) for h in train], lw=1,
                       color="tab:orange")
        tokens_ax.set_ylabel("tokens/s (orange)")
    speed_ax.set(title="throughput", xlabel="optimizer step", ylabel="examples/s (blue)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def model_card(*, base: str, config: dict[str, Any], data: dict[str, Any], best: dict[str, Any] | None,
               before: dict[str, Any] | None, heads: list[str], hidden: int, dims: list[int], profile,
               trained_heads: str | None = None) -> str:
    rows = []
    for dim in dims:
        b = (before or {}).get(str(dim), {})
        a = (best or {}).get("metrics", {}).get(str(dim), {})
        rows.append(f"| {dim} | " + " | ".join(f"{b.get(m, float('nan')):.4f} → {a.get(m, float('nan')):.4f}"
                                               for m in ("recall@10", "mrr@10", "ndcg@10")) + " |")
    type_rows = [f"| {t} | " + " | ".join(f"{per.get(str(d), {}).get('ndcg@10', float('nan')):.4f}" for d in dims)
                 + " |" for t, per in sorted((best or {}).get("by_type", {}).items())]
    type_table = ("\n\nnDCG@10 of each query type at the best checkpoint (validation queries: "
                  f"{json.dumps(data.get('validation_queries_by_type', {}))}):\n\n| type | "
                  + " | ".join(f"{d}d" for d in dims) + " |\n|---|" + "---|" * len(dims) + "\n"
                  + "\n".join(type_rows)) if type_rows else ""
    heads_note = (f"\nThe base model's {', '.join(heads)} (BGE-M3's sparse and ColBERT heads) were copied "
                  "unchanged: **they were not retrained** and do not match the fine-tuned encoder's hidden "
                  "states as well as they matched the base model's.\n" if heads else "")
    if trained_heads:  # unified training: "loaded" (from the base model) or "fresh" (seeded)
        heads_note = (f"\nBGE-M3's sparse (`sparse_linear.pt`) and multi-vector (`colbert_linear.pt`) heads "
                      f"({'from the base model' if trained_heads == 'loaded' else 'created fresh'}) were trained "
                      "with the encoder (unified loss with self-distillation, weights in the config below); "
                      f"`FlagEmbedding.BGEM3FlagModel(PATH, pooling_method=\"{profile.pooling}\")` loads all three "
                      "heads (give it the texts as prepared above). Matryoshka truncation applies to the dense "
                      "head only.\n")
    pooling_text = "CLS pooling" if profile.pooling == "cls" else "Mean pooling"
    pool_how = "take `last_hidden_state[:, 0]`" if profile.pooling == "cls" else \
        "average `last_hidden_state` over the attention mask"
    prompt_text = "".join(f" {role} texts start with `{text}`." for role, text in
                          (("Query", profile.query_prompt), ("Passage", profile.passage_prompt)) if text)
    if profile.strip_marks:
        prompt_text += (" It was trained on Arabic without tashkeel and Quranic marks: strip them before encoding "
                        "(`m3tune.arabic.strip_marks`), as m3tune does; sentence-transformers does not.")
    config_lines = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in config.items())
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
base_model: {base}
tags: [sentence-transformers, feature-extraction, matryoshka, arabic, quran, hadith]
---

# {base} fine-tuned for Arabic Islamic search (m3tune)

Dense retrieval embeddings for Quran verses and hadith, from Arabic and English queries: {base}
fine-tuned by m3tune's `train` step with a Matryoshka InfoNCE loss (temperature {config['temperature']}) over
in-batch, cross-device and hard negatives. {pooling_text}, L2-normalised, {hidden} dims.{prompt_text}

## Use

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("PATH")                       # {hidden} dims
q = model.encode_query(["..."]); d = model.encode_document(["..."])   # the prompts are applied
small = SentenceTransformer("PATH", truncate_dim={dims[-1]})    # Matryoshka: any of {dims}, re-normalised
```

or with transformers: `AutoModel.from_pretrained(PATH)`, {pool_how}, L2-normalise (truncate
to one of the trained dims first for a smaller vector). `truncate_dim` trades quality for size along the
validation table below; dims that were not trained are not guaranteed to work.
{heads_note}
## Validation (before → best checkpoint, step {(best or {}).get('step', '-')})

Retrieval of the validation queries over their positives and a seeded sample of the corpus
({data.get('validation_passages', '?')} passages; never a held-out one). The best checkpoint is chosen on
{config.get('select_metric')} at {config.get('select_dim') or 'the largest dim'}.

| dims | Recall@10 | MRR@10 | nDCG@10 |
|---|---|---|---|
{chr(10).join(rows)}{type_table}

![validation curves]({CURVES})

## Data

```
{json.dumps(data, indent=2, ensure_ascii=False)}
```

## Training config

```yaml
train:
{config_lines}
```
"""
