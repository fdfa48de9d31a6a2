"""The encoder's vectors are the model's: the fast path (Rust tokenizer, token-length batches) against a plain
transformers reference, on short and truncated texts, with and without a query instruction."""

from __future__ import annotations

import numpy as np
import pytest

TEXTS = [
    "بسم الله الرحمن الرحيم",
    "إِنَّمَا الأَعْمَالُ بِالنِّيَّاتِ، وَإِنَّمَا لِكُلِّ امْرِئٍ مَا نَوَى، فَمَنْ كَانَتْ هِجْرَتُهُ إِلَى دُنْيَا يُصِيبُهَا "
    "أَوْ إِلَى امْرَأَةٍ يَنْكِحُهَا فَهِجْرَتُهُ إِلَى مَا هَاجَرَ إِلَيْهِ",  # longer than max_length: truncated
    "Patience",
    "What does the Quran say about patience in hardship and gratitude in ease?",
    "ا",
]


def reference(path: str, texts: list[str], max_length: int) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for t in texts:  # one at a time: no padding at all
            tokens = tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")
            cls = model(**tokens).last_hidden_state[:, 0]
            out.append(torch.nn.functional.normalize(cls, dim=-1)[0].numpy())
    return np.stack(out)


@pytest.mark.parametrize("runtime", ["auto", "torch"])
@pytest.mark.parametrize("instruction", [None, "Represent this query: "])
def test_vectors_match_a_plain_transformers_reference(instruction, runtime):
    from m3tune.arabic import strip_marks
    from m3tune.encoder.model import Encoder
    from m3tune.encoder.profiles import resolve
    from m3tune.encoder.tiny import TINY

    encoder = Encoder(TINY, max_length=16, batch_size=2, query_prompt=instruction, runtime=runtime)
    assert encoder._rust is not None  # the fast path is the one under test
    # on CPU the default runs the exported model in ONNX Runtime, the PyTorch model never loaded
    assert encoder.runtime == ("onnx" if runtime == "auto" else "torch")
    assert (encoder.model is None) == (runtime == "auto")
    got = encoder.encode(TEXTS, queries=True)
    # what the model sees: the prompt, then the text without Arabic marks (the profile's default)
    expected = reference(resolve(TINY), [(instruction or "") + strip_marks(t) for t in TEXTS], 16)
    assert np.allclose(got, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_a_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    import shutil

    from m3tune.encoder.model import Encoder
    from m3tune.encoder.profiles import resolve
    from m3tune.encoder.tiny import TINY
    from m3tune.errors import UserError

    folder = tmp_path / "model"
    shutil.copytree(resolve(TINY), folder)
    (folder / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(UserError, match="tokenizer.json: not a tokenizer file"):
        Encoder(str(folder))


def test_fingerprint_is_the_same_model_anywhere_and_changes_with_its_weights(tmp_path):
    import time

    import torch
    from transformers import AutoModel

    from m3tune.encoder.model import _fingerprint
    from m3tune.encoder.tiny import TINY, build_tiny

    a = build_tiny(tmp_path / "a")
    time.sleep(0.01)
    b = build_tiny(tmp_path / "b")  # another pod's build: other folder, other mtimes
    fp = lambda path: _fingerprint(TINY, str(path), "cls", 512, None, None)  # noqa: E731
    assert fp(a) == fp(b)
    model = AutoModel.from_pretrained(b)
    with torch.no_grad():  # "retrained": only the last layer moves
        model.encoder.layer[-1].output.dense.weight.add_(0.01)
    model.save_pretrained(b)
    assert fp(a) != fp(b)


def test_the_onnx_export_is_cached_and_a_bad_cached_file_is_exported_again(tmp_path, monkeypatch, caplog):
    from m3tune.encoder import onnxrt
    from m3tune.encoder.model import Encoder
    from m3tune.encoder.profiles import resolve
    from m3tune.encoder.tiny import TINY

    resolve(TINY)  # the tiny model's folder is built in the session cache, before the cache moves
    monkeypatch.setenv("M3TUNE_CACHE", str(tmp_path))
    exports = []
    real_export = onnxrt.export
    monkeypatch.setattr(onnxrt, "export", lambda *a: exports.append(a) or real_export(*a))
    first = Encoder(TINY, max_length=16).encode(TEXTS)
    (file,) = (tmp_path / "onnx").glob("*/model.onnx")
    assert (file.parent / "model.onnx.data").stat().st_size > file.stat().st_size  # the weights beside the graph
    assert not list((tmp_path / "onnx").glob(".*"))  # written in a temporary folder, renamed
    assert np.allclose(Encoder(TINY, max_length=16).encode(TEXTS), first, atol=1e-6)
    assert len(exports) == 1  # the second encoder loaded the cached file
    file.write_bytes(b"not an onnx model")
    assert np.allclose(Encoder(TINY, max_length=16).encode(TEXTS), first, atol=1e-6)
    assert len(exports) == 2 and "exporting again" in caplog.text
    assert not list((tmp_path / "onnx").glob(".*"))  # the bad export replaced, nothing left beside it


def test_int8_runs_a_quantized_export_cached_beside_the_fp32_one(tmp_path, monkeypatch):
    import onnx

    from m3tune.encoder import onnxrt
    from m3tune.encoder.model import Encoder
    from m3tune.encoder.profiles import resolve
    from m3tune.encoder.tiny import TINY

    resolve(TINY)
    monkeypatch.setenv("M3TUNE_CACHE", str(tmp_path))
    fp32 = Encoder(TINY, max_length=16)
    quantized = []
    real_quantize = onnxrt.quantize
    monkeypatch.setattr(onnxrt, "quantize", lambda *a: quantized.append(a) or real_quantize(*a))
    int8 = Encoder(TINY, max_length=16, dtype="int8")
    assert int8.runtime == "onnx" and int8.model is None
    # its own fingerprint: int8 vectors are never served from the cache as fp32 ones, nor the reverse
    assert int8.fingerprint != fp32.fingerprint
    (folder,) = (tmp_path / "onnx").glob("*-int8")
    assert (folder.with_name(folder.name.removesuffix("-int8")) / "model.onnx").is_file()
    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops  # the matrix products run in int8
    a, b = fp32.encode(TEXTS), int8.encode(TEXTS)
    cosine = (a * b).sum(axis=1)
    assert not np.allclose(a, b, atol=1e-5) and cosine.min() > 0.95, cosine  # near the fp32 vectors, not them
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.allclose(Encoder(TINY, max_length=16, dtype="int8").encode(TEXTS), b, atol=1e-6)
    assert len(quantized) == 1 and not list((tmp_path / "onnx").glob(".*"))  # cached, written atomically


def test_an_unknown_or_impossible_runtime_is_a_clear_error():
    from m3tune.encoder.model import Encoder
    from m3tune.encoder.tiny import TINY
    from m3tune.errors import UserError

    with pytest.raises(UserError, match="runtime 'tensorrt': expected auto, torch or onnx"):
        Encoder(TINY, runtime="tensorrt")
    with pytest.raises(UserError, match="runtime onnx: .* in bf16 is not exported"):
        Encoder(TINY, runtime="onnx", dtype="bf16")
    with pytest.raises(UserError, match="dtype int8: .* with runtime torch: int8 runs through ONNX Runtime on CPU"):
        Encoder(TINY, runtime="torch", dtype="int8")
    with pytest.raises(UserError, match="dtype 'int4': expected one of auto, fp32, fp16, bf16, int8"):
        Encoder(TINY, dtype="int4")


def test_the_index_and_the_mining_settings_of_one_model_share_one_loaded_encoder():
    from m3tune.encoder.model import load_encoder
    from m3tune.encoder.tiny import TINY

    index = load_encoder(TINY, max_length=16)  # the index step's config: None for the profile's values
    # mine-negatives passes what index.json recorded: the same settings, resolved
    assert load_encoder(TINY, pooling="cls", query_prompt="", passage_prompt="", max_length=16,
                        strip_marks=True) is index
    assert load_encoder(TINY, max_length=32) is not index


def test_onnx_runtime_threads_sleep_rather_than_spin():
    """On shared cores ONNX Runtime's default spin-waiting takes the cores other work needs (benchmarks/ratios.py
    runs both sides with it off); the vectors are the reference's either way (the test above)."""
    from m3tune.encoder.model import Encoder
    from m3tune.encoder.tiny import TINY

    options = Encoder(TINY, max_length=16)._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
