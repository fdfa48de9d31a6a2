"""The encoder on CPU through ONNX Runtime: the same fp32 model, exported once per model and cached.

Why: on CPU, PyTorch runs a BERT layer as separate kernels (bias add, erf GELU,
softmax, LayerNorm, and copies around the attention reshapes: a quarter of a
forward on e5-small beside the matrix products). ONNX Runtime fuses some of
them (BiasGelu, the scaled QK^T; its built-in optimizer leaves the attention
and LayerNorm unfused on this graph) and runs the same fp32 matrix products:
measured ~1.4x the passages/s of the PyTorch path on e5-small (about 1.0-1.1x
at 256-token passages, where the matrix products are nearly all of it), vectors
within 2e-6 of it (docs/benchmarks.md). Nothing is quantized and no
weight changes: it is the same computation with fewer memory passes.

The graph is exported with torch's TorchScript exporter from the model loaded
with eager attention (transformers' SDPA mask builder does not trace: its
exported graph returned wrong vectors for padded batches), the padding mask
turned into the additive 4-D mask eager attention takes. It is written to the
folder `<cache>/onnx/<fingerprint>/` (the fingerprint of the weights and config:
`model._fingerprint`): the graph in `model.onnx`, the weights beside it in
`model.onnx.data`, built in a temporary folder renamed into place, so a killed
export leaves no half-written model. The weights are kept apart because ONNX
Runtime memory-maps an external data file rather than copying it: the word-
embedding matrix (250k x 384 floats, 370 MB of e5-small's 450) then costs
memory only for the rows of the tokens a run meets, and the session opens in
a fraction of the time (measured on e5-small: peak memory of `index` +
`mine-negatives` ~370 MB lower, docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("m3tune.encoder")

# the architectures whose embeddings(input_ids) -> encoder(hidden, 4-D mask) split is exported (BERT: e5; XLM-R:
# BGE-M3 and the tiny test model)
MODEL_TYPES = ("bert", "xlm-roberta")
# protobuf cannot hold a model above 2 GB in one file (BGE-M3 in fp32 is 2.3 GB): those stay on PyTorch
MAX_BYTES = 1_900_000_000
# the graph's file in an export's folder; its weights are in MODEL + ".data"
MODEL = "model.onnx"


def installed() -> bool:
    """Whether onnxruntime and onnx (the exporter's writer) are installed (the `encode` extra has both; an
    environment without them encodes with PyTorch)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def supported(config) -> bool:
    """Whether the model of CONFIG (a transformers config) is exported: a known architecture, under 2 GB in fp32
    (its parameters counted from the config: the embeddings, then per layer attention and feed-forward)."""
    if config.model_type not in MODEL_TYPES:
        return False
    h = config.hidden_size
    params = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h + \
        config.num_hidden_layers * (4 * h * h + 2 * h * config.intermediate_size)
    return params * 4 < MAX_BYTES


def load(path: str, fingerprint: str, threads: int, *, int8: bool = False):
    """A session on the cached ONNX export of the model at PATH, exported on first use; a cached export ONNX
    Runtime cannot load (a disk error, a file from an incompatible exporter) is exported again. INT8: the
    export with its linear layers quantized (`quantize`), made from the fp32 export and cached beside it."""
    from m3tune.encoder.tiny import cache_dir

    folder = cache_dir() / "onnx" / fingerprint
    wanted = folder.with_name(f"{fingerprint}-int8") if int8 else folder
    if (wanted / MODEL).is_file():
        try:
            return session(wanted / MODEL, threads)
        except Exception as e:  # noqa: BLE001 — whatever ONNX Runtime raises on a bad file, export it again
            log.warning("%s: ONNX Runtime cannot load it (%s); %s again", wanted / MODEL,
                        str(e).splitlines()[0][:200], "quantizing" if int8 else "exporting")
    if not int8:
        return session(export(path, folder) / MODEL, threads)
    if not (folder / MODEL).is_file():
        export(path, folder)
    return session(quantize(folder, wanted) / MODEL, threads)


def export(path: str, out: Path) -> Path:
    """Export the Hugging Face encoder at PATH (fp32, eager attention) to the folder OUT, atomically: the graph
    in OUT/model.onnx, the weights in OUT/model.onnx.data (memory-mapped by ONNX Runtime)."""
    import warnings

    import onnx
    import torch
    from transformers import AutoModel

    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        """(input ids, 0/1 mask) -> last hidden state, with the mask made additive here: the graph then has no
        mask-building code that depends on the traced shapes."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model.embeddings(input_ids=input_ids)
            additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
            return self.model.encoder(hidden, attention_mask=additive).last_hidden_state

    held = [Hidden(model)]  # popped into the exporter: the PyTorch weights are freed before the graph is loaded
    del model

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(held.pop(), example, str(tmp / "whole.onnx"), input_names=["input_ids", "attention_mask"],
                              output_names=["hidden"], opset_version=17, dynamo=False,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "hidden": axes})
        graph = onnx.load(str(tmp / "whole.onnx"))
        # every weight above 1 KiB in one file beside the graph, which ONNX Runtime maps (at any offset)
        onnx.save_model(graph, str(tmp / MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL + ".data", size_threshold=1024)
        del graph
        (tmp / "whole.onnx").unlink()

    example = (torch.ones((2, 8), dtype=torch.long), torch.ones((2, 8), dtype=torch.long))
    axes = {0: "batch", 1: "tokens"}
    _publish(out, write)
    log.info("exported %s to ONNX in %.1f s: %s", path, time.perf_counter() - t0, out)
    return out


def quantize(source: Path, out: Path) -> Path:
    """The fp32 export in the folder SOURCE with the weights of its matrix products in int8 (per output
    channel), written to the folder OUT, atomically; activations are quantized per batch as it runs (ONNX
    Runtime's dynamic quantization). Why: on CPU the fp32 matrix products are ~80% of a forward at 256
    tokens (onnxrt's note above) and both sides of a comparison run the same ones; int8 ones are ~1.4-1.6x
    faster on e5-small. It changes the vectors (cosine ~0.997 to the fp32 ones on real text, a query's top 10
    ~72% the same; docs/benchmarks.md), so it is an explicit choice (`dtype: int8`), never the default.

    reduce_range: weights in 7 bits. x86 CPUs without VNNI (AVX2 only, like this project's CI machine)
    multiply u8 x s8 pairs into saturating int16 sums, which 8-bit weights can overflow; ONNX Runtime's
    documentation asks for the reduced range there."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()

    def write(tmp: Path) -> None:
        # only MatMul: the word embeddings stay fp32 and memory-mapped (a run reads only the rows it meets)
        quantize_dynamic(source / MODEL, tmp / MODEL, op_types_to_quantize=["MatMul"], per_channel=True,
                         reduce_range=True, weight_type=QuantType.QInt8, use_external_data_format=True)

    _publish(out, write)
    log.info("quantized the ONNX export to int8 in %.1f s: %s", time.perf_counter() - t0, out)
    return out


def _publish(out: Path, write) -> None:
    """Run WRITE(tmp) in a temporary folder beside OUT, then rename it to OUT: a killed export leaves no
    half-written model, and a bad one is replaced whole."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*-*"):  # exports killed before their rename (an hour is ample)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        for f in (tmp, *tmp.iterdir()):  # mkdtemp's 0700 would hide a cache built by root
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if out.exists():  # a bad export being replaced: moved aside first (a folder cannot be renamed over one)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "export")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / MODEL).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process published the same export meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def session(file: Path, threads: int):
    """An ONNX Runtime session on FILE with every graph optimization (the fusions are the point)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads  # torch's setting: one knob for both runtimes
    options.inter_op_num_threads = 1
    # ONNX Runtime's threads spin-wait between operators by default: on a machine whose cores are shared
    # (2 CPU cores running a step beside the tokenizer, an upload or another pod) the spinning takes the cores
    # the other work needs. Off, they sleep; the vectors are the same (benchmarks/ratios.py measures both sides
    # with it off).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
