"""Reliability round 3: odd local inputs, tampered run roots, data and config accepted silently.

Each test names what happened before its fix. A traceback is the CliRunner's `exception` being anything but
SystemExit; a one-line error is the last line of stderr.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from m3tune.cli import app
from m3tune.errors import BadInput, ConfigError
from m3tune.jsonl import RecordError, read_jsonl
from m3tune.records import Example, Passage, PassageInput, Query


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def _last_error(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def _no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"traceback: {result.exception!r}\n{result.output}"


def _read(model, text: str, name: str = "f.jsonl") -> list:
    return list(read_jsonl(io.BytesIO(text.encode()), model, name=name))


def _passage(**over) -> dict:
    row = {"id": "u:1", "source": "hadith", "collection": "u", "text": "نص", "text_plain": "نص", "meta": {}}
    row.update(over)
    return row


# ---------------------------------------------------------------------------------- 3. data accepted silently

def test_a_10_mb_meta_value_is_refused_with_file_line_and_field():
    # Before: accepted, then carried, copied and published by every later step.
    line = json.dumps(_passage(meta={"note": "x" * 10_000_000}))
    with pytest.raises(RecordError, match=r"^f.jsonl:1: field 'meta': .*MAX_META_CHARS"):
        _read(Passage, line)


@pytest.mark.parametrize("model,row,field", [
    (Passage, _passage(text_plain=" "), "text_plain"),
    (PassageInput, {"id": "u:1", "source": "hadith", "text": " \t "}, "text"),
    (Query, {"id": "q1", "query": "  ", "language": "ar", "type": "question", "positive_ids": ["u:1"],
             "source": "hadith", "generator": {"backend": "b", "model": "m", "prompt_version": "v"}}, "query"),
    (Example, {"query": "ما الصبر", "pos": [" "]}, "pos.0"),
])
def test_blank_text_is_refused_with_the_field(model, row, field):
    # Before: " " passed min_length=1 and was searched, indexed and trained on as a text.
    with pytest.raises(RecordError, match=rf"^f.jsonl:1: field '{field}': blank: white space only, no text$"):
        _read(model, json.dumps(row))


def test_duplicate_json_keys_are_refused_with_the_key():
    # Before: pydantic's parser kept the last value: {"text": "a", ..., "text": "b"} silently became "b".
    line = '{"id": "u:1", "source": "hadith", "text": "نص", "source": "quran"}'
    with pytest.raises(RecordError, match=r"^f.jsonl:2: field 'source': duplicate key"):
        _read(PassageInput, '{"id": "u:0", "source": "hadith", "text": "نص"}\n' + line)
    nested = '{"id": "u:1", "source": "hadith", "text": "نص", "meta": {"g": 1, "g" : 2}}'
    with pytest.raises(RecordError, match=r"^f.jsonl:1: field 'g': duplicate key"):
        _read(PassageInput, nested)


def test_a_5_million_character_query_never_reaches_train_jsonl(tmp_path):
    # Before: accepted by combine (Text had no upper bound) and written to train.jsonl.
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"query": "س" * 5_000_000, "pos": ["نص"]}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(RecordError, match=r"in.jsonl:1: field 'query': String should have at most 4000 characters"):
        list(read_jsonl(rows.open("rb"), Example, name=str(rows)))


def test_a_line_beyond_the_line_limit_is_refused_without_reading_it_whole(monkeypatch):
    from m3tune import jsonl

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 100)
    text = '{"query": "ما", "pos": ["' + "x" * 500 + '"]}\n{"query": "ما", "pos": ["نص"]}\n'
    with pytest.raises(RecordError, match=r"^f.jsonl:1: line longer than 100 bytes"):
        _read(Example, text)
    rejects = jsonl.Rejects()
    kept = list(read_jsonl(io.BytesIO(text.encode()), Example, name="f.jsonl", rejects=rejects))
    assert len(kept) == 1 and rejects.rows[0]["line"] == 1


# ------------------------------------------------------------------------------- 1. odd local inputs

def _ingest(root: Path) -> None:
    result = cli("step", "ingest", "--root", str(root), "--source", "quran", "--limit", "3")
    assert result.exit_code == 0, result.output


def test_a_config_with_a_nul_byte_is_exit_4_naming_the_file(tmp_path):
    # Before: PyYAML's ReaderError was raised where the loader was built, outside the handled block: a traceback.
    config = tmp_path / "run.yaml"
    config.write_bytes(b"ingest:\n  limit: 3\x00\n")
    result = cli("run", "--root", str(tmp_path / "r"), "--config", str(config), "--until", "ingest")
    _no_traceback(result)
    assert result.exit_code == 4 and _last_error(result).startswith(f"error: {config}")
    assert "#x0000" in _last_error(result)


def test_a_malformed_themes_yaml_is_exit_4_naming_the_file(tmp_path):
    # Before: yaml.safe_load's ScannerError came out of generate-conceptual as a traceback.
    themes = tmp_path / "themes.yaml"
    themes.write_text("version: 1\nthemes: [\n  - id: x\n    ar: [\"a\"\n")
    root = tmp_path / "r"
    _ingest(root)
    result = cli("step", "generate-conceptual", "--root", str(root), "--themes", str(themes))
    _no_traceback(result)
    assert result.exit_code == 4 and _last_error(result).startswith(f"error: {themes}:"), result.output


def test_a_prompt_file_with_a_stray_dollar_is_an_error_naming_the_file_and_line(tmp_path):
    # Before: string.Template's ValueError ("Invalid placeholder") at the first prompt built: a traceback.
    prompt = tmp_path / "my-prompt.txt"
    prompt.write_text("[system]\nYou write queries.\n[user]\nPassage: $text\nIt costs $5.\n", encoding="utf-8")
    from m3tune.generation.prompts import load_prompt

    with pytest.raises(BadInput, match=rf"^{prompt}:5: invalid placeholder '\$5'.*\$\$"):
        load_prompt(str(prompt))


def test_a_path_with_rich_markup_is_printed_as_text(tmp_path):
    # Before: the analyze step wrote report.json and its manifest, then its table's title (the input's path)
    # was read as markup: "[/]" raised MarkupError, a traceback after the step had finished.
    folder = tmp_path / "a[/]b"  # the folders "a[" and "]b"
    folder.mkdir(parents=True)
    rows = folder / "q.jsonl"
    rows.write_text(json.dumps({"query": "ما الصبر", "pos": ["نص"]}, ensure_ascii=False) + "\n", encoding="utf-8")
    result = cli("step", "analyze", "--root", str(folder / "r"), "--input", str(rows), "--conceptual-target", "0",
                 "--quran-target", "0", "--arabic-target", "0")
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    assert "a[/]b" in result.stdout.replace("\n", "")


def test_a_root_that_is_a_regular_file_is_an_error_naming_it(tmp_path):
    # Before: NotADirectoryError from the first manifest read: a traceback.
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = cli("step", "ingest", "--root", str(afile), "--source", "quran", "--limit", "3")
    _no_traceback(result)
    assert result.exit_code == 1 and str(afile) in _last_error(result) and "not a folder" in _last_error(result)


def test_an_output_dir_that_is_a_file_is_refused_before_evaluating(tmp_path):
    # Before: NotADirectoryError (a traceback) after every model had been evaluated.
    root = tmp_path / "r"
    _ingest(root)
    out = tmp_path / "out"
    out.write_text("x")
    result = cli("evaluate", "--root", str(root), "--model", "bm25", "--output-dir", str(out))
    _no_traceback(result)
    assert result.exit_code == 1 and f"--output-dir {str(out)!r}" in _last_error(result), result.output


def test_a_cache_that_cannot_be_written_is_an_error_naming_it(tmp_path):
    # Before: NotADirectoryError (PermissionError for a read-only folder) from the tiny model's build or the
    # embeddings cache: a traceback. A file where the folder belongs fails the same way for root too.
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    root = tmp_path / "r"
    _ingest(root)
    result = cli("step", "index", "--root", str(root), "--model", "local:tiny-xlmr", env={"M3TUNE_CACHE": str(cache)})
    _no_traceback(result)
    assert result.exit_code == 1 and str(cache) in _last_error(result), result.output


def _config_only_model(folder: Path, **config) -> Path:
    """A model folder with a config.json alone: enough for every check made before the weights are read."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


XLMR = {"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1, "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}


def test_a_max_length_beyond_the_model_positions_is_a_config_error(tmp_path):
    # Before: accepted; ONNX Runtime truncated nothing and PyTorch raised an IndexError from the position
    # embeddings at the first text longer than the model's 512 positions.
    from m3tune.encoder.model import Encoder

    model = _config_only_model(tmp_path / "m", **XLMR)
    with pytest.raises(ConfigError, match=r"max_length 100000: .* reads at most 512 tokens.*--max-length"):
        Encoder(str(model), max_length=100_000)


# ------------------------------------------------------------------------------- 2. tampered run roots

def test_an_auto_map_with_an_unknown_model_type_is_exit_4_naming_config_json(tmp_path):
    # Before: transformers' ValueError (unknown model type / trust_remote_code) came out as a traceback.
    model = _config_only_model(tmp_path / "m", model_type="evil-net", auto_map={"AutoModel": "evil.EvilModel"})
    root = tmp_path / "r"
    _ingest(root)
    result = cli("step", "index", "--root", str(root), "--model", str(model))
    _no_traceback(result)
    assert result.exit_code == 4 and _last_error(result).startswith(f"error: {model}/config.json: "), result.output


def _trainer_state(**over) -> dict:
    state = {"step": 10, "history": [], "best": {"step": 10, "score": 0.5, "checkpoint": "step-00000010"},
             "bad_evals": 0, "before": None, "stopped_early": False, "examples_seen": 160, "config_digest": "x"}
    state.update(over)
    return state


@pytest.mark.parametrize("edit,field", [
    (lambda s: s.pop("history"), "history"),
    (lambda s: s.update(step="10"), "step"),
    (lambda s: s.update(best=[1]), "best"),
])
def test_an_edited_trainer_state_is_exit_4_naming_the_file_and_field(tmp_path, edit, field):
    # Before: a KeyError or a TypeError from the loop when a run resumed: a traceback.
    from m3tune.training.loop import read_trainer_state

    state = _trainer_state()
    edit(state)
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(state))
    with pytest.raises(BadInput, match=rf"^s3://b/step-1/trainer_state.json: tampered: field '{field}"):
        read_trainer_state(path, "s3://b/step-1/trainer_state.json")
    path.write_text("{not json")
    with pytest.raises(BadInput, match=r"trainer_state.json: tampered: .*Invalid JSON"):
        read_trainer_state(path, "s3://b/step-1/trainer_state.json")
    assert read_trainer_state(_write(tmp_path / "ok.json", _trainer_state()), "ok")["step"] == 10


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


class _Payload:
    """A pickle that, unpickled without weights_only, creates a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("target", ["pytorch_model.bin", "optimizer.bin"])
def test_a_pickle_payload_in_a_checkpoint_is_exit_4_and_runs_nothing(tmp_path, target):
    # Before: refused by torch.load(weights_only=True), but as an UnpicklingError traceback.
    import pickle

    import torch
    from accelerate import Accelerator

    from m3tune.training.loop import load_checkpoint_state

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    folder = tmp_path / "step-00000010"
    accelerator.save_state(str(folder))
    if target == "pytorch_model.bin":
        (folder / "model.safetensors").unlink()  # Accelerate then loads the pickled weights file
    marker = tmp_path / "code-ran"
    (folder / target).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(BadInput, match=r"^s3://b/train/checkpoints/step-00000010: tampered or corrupt checkpoint, "
                                       r"refused \(UnpicklingError"):
        load_checkpoint_state(accelerator, folder, "s3://b/train/checkpoints/step-00000010")
    assert not marker.exists()


def test_a_truncated_embeddings_cache_shard_is_exit_4_naming_it(tmp_path):
    # Before: zipfile.BadZipFile from numpy when the cache was opened: a traceback.
    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.runroot import open_root

    store = open_root(str(tmp_path / "cache"))

    class Fake:
        dim = 4

        def encode(self, texts, **_):
            return np.ones((len(texts), 4), dtype=np.float32)

    EmbeddingCache(store, "fp").encode(Fake(), ["a", "b"])
    shard = next((tmp_path / "cache" / "fp").glob("shard-*.npz"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(BadInput, match=rf"{shard.name}: corrupt embeddings cache shard .*remove it"):
        EmbeddingCache(store, "fp")


def test_a_manifest_missing_an_entry_is_exit_4_naming_the_manifest(tmp_path):
    # Before: a KeyError ('passages.jsonl') from the consumer, and a multi-line pydantic dump (exit 1) for a
    # manifest missing a field.
    root = tmp_path / "r"
    _ingest(root)
    path = root / "ingest" / "_manifest.json"
    manifest = json.loads(path.read_text())
    without = {**manifest, "outputs": {k: v for k, v in manifest["outputs"].items() if k != "passages.jsonl"}}
    path.write_text(json.dumps(without))
    result = cli("step", "generate-queries", "--root", str(root))
    _no_traceback(result)
    assert result.exit_code == 4, result.output
    assert _last_error(result).endswith("ingest/_manifest.json: tampered: records no 'passages.jsonl', which step "
                                        "'ingest' publishes; rerun that step with --force")
    del manifest["outputs"]["passages.jsonl"]["sha256"]
    path.write_text(json.dumps(manifest))
    result = cli("step", "generate-queries", "--root", str(root))
    assert result.exit_code == 4 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "_manifest.json: tampered: not a valid manifest: field 'outputs.passages.jsonl.sha256'" in _last_error(result)


class _FakeEncoder:
    name, dim = "fake", 4

    def __init__(self, value: float = 1.0):
        self.value = value

    def encode(self, texts, **_):
        return np.full((len(texts), self.dim), self.value, dtype=np.float32)


def test_cached_vectors_of_another_width_or_nan_are_refused_naming_the_cache(tmp_path):
    # Before: a shard of 8-d vectors under a 4-d encoder's fingerprint was served (np.stack failed on a mix);
    # a model encoding NaN cached them, and publish uploaded them.
    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.runroot import open_root

    store = open_root(str(tmp_path / "cache"))
    wide = _FakeEncoder()
    wide.dim = 8
    EmbeddingCache(store, "fp").encode(wide, ["a"])
    with pytest.raises(BadInput, match=r"cache/fp: cached vectors of shape \(8,\), but fake makes 4-d ones"):
        EmbeddingCache(store, "fp").encode(_FakeEncoder(), ["a"])
    with pytest.raises(BadInput, match=r"^fake encoded 1 of 1 vectors with NaN"):
        EmbeddingCache(store, "fp2").encode(_FakeEncoder(float("nan")), ["b"])
    assert not (tmp_path / "cache" / "fp2").exists()  # nothing cached from them


def test_an_edited_shard_with_nan_vectors_is_refused(tmp_path):
    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.runroot import open_root

    store = open_root(str(tmp_path / "cache"))
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(["k"]), vectors=np.full((1, 4), np.nan, dtype=np.float32))
    store.child("fp").write_bytes("shard-1.npz", buffer.getvalue())
    with pytest.raises(BadInput, match=r"shard-1.npz: corrupt embeddings cache shard \(vectors with NaN"):
        EmbeddingCache(store, "fp")


def test_duplicate_corpus_ids_in_evaluate_are_refused_with_file_and_line(tmp_path):
    # Before: two passages under one id were both indexed: a relevant id could count twice in the metrics.
    corpus = tmp_path / "corpus.jsonl"
    rows = [_passage(id="quran:1:1"), _passage(id="quran:1:2"), _passage(id="quran:1:1", text="آخر")]
    corpus.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    result = cli("evaluate", "--corpus", str(corpus), "--model", "bm25", "--output-dir", str(tmp_path / "out"))
    _no_traceback(result)
    assert result.exit_code == 4, result.output
    assert _last_error(result).endswith(f"{corpus}:3: field 'id': quran:1:1 repeats line 1: ids must be unique in "
                                        "a corpus")


# ----------------------------------------------------------------------------- 4. config accepted silently

@pytest.mark.parametrize("option", ["--arabic-target", "--tolerance", "--quran-target"])
def test_a_negative_target_cannot_disable_the_analyze_gate(tmp_path, option):
    # Before: `m3tune analyze --arabic-target -1` passed every target (a share is always >= -1 - tolerance).
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"query": "what is patience", "pos": ["نص"]}) + "\n", encoding="utf-8")
    result = cli("analyze", str(rows), option, "-1", "--fail-on-miss")
    _no_traceback(result)
    assert result.exit_code == 1 and _last_error(result) == f"error: {option} -1.0: a share between 0 and 1 " \
        f"(analyze: {option[2:].replace('-', '_')})", result.output


def test_dims_of_zero_or_less_are_a_config_error_naming_the_option(tmp_path):
    # Before: --dims 0,-8 was accepted: vectors cut to nothing (or counted from the end), metrics of nothing.
    result = cli("evaluate", "--corpus", str(tmp_path / "none.jsonl"), "--model", "bm25", "--dims", "0,-8")
    _no_traceback(result)
    assert result.exit_code == 1 and "--dims: 0 is not a dimension" in _last_error(result), result.output


def test_a_held_out_list_with_unknown_ids_or_none_at_all_is_a_config_error(tmp_path):
    # Before: an id with a typo held nothing out; an empty file meant "hold nothing out", both without a word.
    from m3tune.corpus import heldout

    empty = tmp_path / "empty.txt"
    empty.write_text("# no ids\n\n")
    with pytest.raises(ConfigError, match=rf"held_out {empty}: the list has no passage ids; .*held_out: null"):
        heldout.load(str(empty))
    typo = tmp_path / "typo.txt"
    typo.write_text("quran:1:1\nquran:1:99\n")
    held = heldout.load(str(typo))
    with pytest.raises(ConfigError, match=rf"held_out {typo}: 1 of its 2 ids are not in the run's corpus "
                                          r"\(first: quran:1:99\)"):
        heldout.check_known(held, {"quran:1:1", "quran:1:2"}, str(typo))
    heldout.check_known(heldout.load("packaged"), {"quran:1:1"}, "packaged")  # a part of the packaged corpus


def test_a_held_out_list_with_unknown_ids_stops_combine(tmp_path):
    root = tmp_path / "r"
    _ingest(root)
    typo = tmp_path / "typo.txt"
    typo.write_text("quran:1:1\nquran:1:99\n")
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"query": "ما الصبر", "pos": ["نص"]}, ensure_ascii=False) + "\n", encoding="utf-8")
    result = cli("step", "combine", "--root", str(root), "--no-mined", "--input", str(rows), "--held-out", str(typo))
    _no_traceback(result)
    assert result.exit_code == 1 and "1 of its 2 ids are not in the run's corpus" in _last_error(result), result.output


@pytest.mark.parametrize("theme,message", [
    ({"id": "t", "ar": ["أ"], "en": ["a"], "lexicon": []}, "theme 't': field 'lexicon' is empty"),
    ({"id": "t", "ar": ["أ"], "en": ["a"], "lexicon": [" "]}, "theme 't': field 'lexicon' is empty"),
    ({"id": "t", "ar": ["أ"], "en": ["a"], "verses": ["2:280-290"]},
     "theme 't': field 'verses': '2:280-290' is out of range (surah 2 has 286 verses)"),
    ({"id": "t", "ar": ["أ"], "en": ["a"], "verses": ["115:1"]},
     "theme 't': field 'verses': '115:1' is out of range (there are 114 surahs)"),
])
def test_themes_that_would_be_dropped_without_a_word_are_config_errors(tmp_path, theme, message):
    # Before: a theme with an empty lexicon matched nothing and verses past a surah's end matched no passage:
    # both were left out of the queries without a word.
    from m3tune.generation.offline import load_themes

    themes = tmp_path / "themes.yaml"
    themes.write_text(json.dumps({"version": "t1", "themes": [theme]}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{themes}: {message}")):
        load_themes(str(themes))
