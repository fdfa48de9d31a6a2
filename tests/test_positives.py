"""All positives everywhere: a thematic query's 40 positives and their near-duplicates are never its negatives
(mining's rules, in-batch, gathered columns); one positive and a pool draw per (seed, epoch, example); the
sampler's drop report; an example whose positive is also a negative is refused."""

from __future__ import annotations

import random

import pytest

from m3tune.errors import UserError
from m3tune.records import Example
from m3tune.training.data import (TrainExample, collate, draw_negatives, global_batches, key_hash,
                                  to_train_example)

THEME = [f"bukhari:{i}" for i in range(1, 41)]  # a thematic query's 40 positives
TWINS = {"bukhari:1": "muslim:1", "bukhari:2": "muslim:2"}  # near-duplicates of two of them


def thematic() -> TrainExample:
    ex = Example(query="الصبر على البلاء", pos=[f"نص {p}" for p in THEME], pos_ids=THEME,
                 neg=[f"نص سلبي {i}" for i in range(30)], neg_ids=[f"muslim:{100 + i}" for i in range(30)],
                 neg_kinds=["hard"] * 16 + ["semi_hard"] * 8 + ["random"] * 6, related_ids=sorted(TWINS.values()),
                 type="conceptual", language="ar", source="hadith")
    return to_train_example(ex)


def others(n: int) -> list[TrainExample]:
    # each other query's pool holds passages of the theme and their twins: another query's hard negatives
    out = []
    for i in range(n):
        negs = [THEME[(i * 3 + k) % 40] for k in range(3)] + list(TWINS.values())
        out.append(to_train_example(Example(
            query=f"سؤال {i}", pos=[f"نص muslim:{500 + i}"], pos_ids=[f"muslim:{500 + i}"],
            neg=[f"نص {p}" for p in negs], neg_ids=negs, type="question", language="ar", source="hadith")))
    return out


def test_mining_rules_guard_every_positive_and_near_duplicate():
    from m3tune.corpus.neardup import NearDuplicates
    from m3tune.mining.filters import FalseNegativeFilter

    near = NearDuplicates([{"kind": "twin", "ids": [p, t]} for p, t in TWINS.items()])
    guarded = near.closure(THEME)
    assert guarded == set(THEME) | set(TWINS.values())
    rule = FalseNegativeFilter(threshold=10.0, jaccard=1.0, tokens=lambda pid: frozenset([pid]))
    window = [(0.1, pid) for pid in THEME + list(TWINS.values()) + ["muslim:999"]]
    assert rule.keep(window, guarded, [frozenset([p]) for p in THEME], 1.0) == [(0.1, "muslim:999")]
    assert rule.dropped["positive"] == 42


def _tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from m3tune.encoder.tiny import build_tiny

    return AutoTokenizer.from_pretrained(str(build_tiny(tmp_path / "tiny")))


def test_no_positive_or_near_duplicate_is_ever_a_negative_in_batch_or_gathered(tmp_path):
    import torch

    from m3tune.training.loss import matryoshka_info_nce

    examples = [thematic()] + others(7)
    tok = _tokenizer(tmp_path)
    guarded = {key_hash(k) for k in THEME + list(TWINS.values())}
    for epoch in range(3):
        batch = collate([examples[0], *examples[1:]], list(range(8)), tok, negatives=5, seed=1, epoch=epoch,
                        query_max_length=16, passage_max_length=16)
        # theme passages sit in the other queries' columns (their hard negatives) and in column 0
        cols = batch.col_keys.tolist()
        assert sum(c in guarded for c in cols) >= 8
        # "gathered": the same batch as if it were 2 processes' columns concatenated; query 0 sits on rank 0
        for gathered in (False, True):
            p_cols = batch.col_keys if not gathered else torch.cat([batch.col_keys, batch.col_keys.flip(0)])
            valid = batch.col_valid if not gathered else torch.cat([batch.col_valid, batch.col_valid.flip(0)])
            q = torch.randn(8, 16, generator=torch.Generator().manual_seed(epoch))
            p = torch.randn(len(p_cols), 16, generator=torch.Generator().manual_seed(7)).requires_grad_()
            loss, _ = matryoshka_info_nce(q[:1], p, pos_keys=batch.pos_keys[:1], col_keys=p_cols, col_valid=valid,
                                          dims=[16, 8], weights=[1.0, 1.0], temperature=0.02, cross_device=False)
            loss.backward()
            touched = {c for c in range(len(p_cols)) if c and p.grad[c].abs().sum() > 0}
            # query 0 scores against no column holding a theme passage or a twin (column 0 is its target)
            assert not {c for c in touched if p_cols[c].item() in guarded}
            assert touched, "the query still has real negatives"


def test_one_positive_and_the_negatives_are_drawn_anew_each_epoch_and_the_same_for_the_same_epoch():
    ex = thematic()
    draws = {e: draw_negatives(ex, 7, random.Random(f"3:{e}:0"), (0.6, 0.3, 0.1)) for e in range(4)}
    assert draws[0] == draw_negatives(ex, 7, random.Random("3:0:0"), (0.6, 0.3, 0.1))
    assert len({tuple(d) for d in draws.values()}) > 1
    for d in draws.values():
        assert len(set(d)) == 7
        kinds = [ex.neg_kinds[j] for j in d]
        assert (kinds.count("hard"), kinds.count("semi_hard"), kinds.count("random")) == (4, 2, 1)
    # a pool short of one kind is filled from the others
    few = TrainExample("q", ("p",), ("x:1",), ("a", "b", "c"), ("x:2", "x:3", "x:4"), ("hard", "random", "random"))
    assert sorted(draw_negatives(few, 3, random.Random(0), (0.6, 0.3, 0.1))) == [0, 1, 2]


def test_collate_draws_the_same_for_the_same_seed_and_epoch(tmp_path):
    tok = _tokenizer(tmp_path)
    examples = [thematic()] + others(3)

    def cols(epoch):
        b = collate(examples, list(range(4)), tok, negatives=5, seed=11, epoch=epoch, query_max_length=16,
                    passage_max_length=16)
        return b.col_keys.tolist()

    assert cols(0) == cols(0)
    assert cols(0) != cols(1)
    seen = {cols(e)[0] for e in range(12)}  # the thematic query's positive column: one of its 40, varying
    assert len(seen) > 1 and seen <= {key_hash(p) for p in THEME}


def test_positive_pool_shows_only_the_first_positives_and_still_masks_them_all(tmp_path):
    tok = _tokenizer(tmp_path)
    examples = [thematic()] + others(3)
    shown = set()
    for epoch in range(40):
        b = collate(examples, list(range(4)), tok, negatives=5, seed=11, epoch=epoch, query_max_length=16,
                    passage_max_length=16, positive_pool=3)
        shown.add(b.col_keys[0].item())
        assert {key_hash(p) for p in THEME} <= set(b.pos_keys[0].tolist())  # all 40 masked, whichever is shown
    assert shown == {key_hash(p) for p in THEME[:3]}  # the three listed first, each some epoch


def test_the_sampler_keeps_what_it_can_and_reports_and_limits_its_drops():
    # 10 thematic queries of one theme share positives: at most one per batch
    theme = [to_train_example(Example(query=f"موضوع {i}", pos=["نص"], pos_ids=["bukhari:1"], type="conceptual",
                                      language="ar", source="hadith")) for i in range(10)]
    free = [to_train_example(Example(query=f"سؤال {i}", pos=[f"نص {i}"], pos_ids=[f"muslim:{i}"], type="question",
                                     language="ar", source="hadith")) for i in range(30)]
    batches = global_batches(theme + free, 4, seed=0, epoch=0)
    placed = sorted(i for b in batches for i in b)
    assert len(placed) == len(set(placed)) == 40 - batches.report["dropped"]
    for b in batches:
        assert sum(1 for i in b if i < 10) <= 1
    # 40 examples fit 10 batches exactly; greedy-then-merge leaves at most one batch's worth out here (no
    # swaps between closed batches), and another epoch's permutation places them
    assert batches.report["dropped"] <= 4
    assert global_batches(theme + free, 4, seed=1, epoch=0).report["dropped"] == 0
    assert set(batches.report["by_type"]) <= {"question", "conceptual"}
    with pytest.raises(UserError, match="'conceptual' examples"):
        global_batches(theme + free[:2], 4, seed=0, epoch=0, max_drop_share=0.1)
    report = global_batches(theme + free[:2], 4, seed=0, epoch=0).report
    assert report["by_type"]["conceptual"] >= 7 and report["by_language"] == {"ar": report["dropped"]}
    assert report["by_source"] == {"hadith": report["dropped"]}


def test_a_positive_that_is_also_a_negative_names_file_line_and_field(tmp_path):
    import json

    from m3tune.combine.step import CombineConfig
    from m3tune.executor import run_step
    from m3tune.runroot import open_root

    rows = [{"query": f"سؤال رقم {i}", "pos": [f"نص {i}"], "pos_ids": [f"bukhari:{i + 1}"], "neg": ["آخر"],
             "neg_ids": [f"muslim:{i + 1}"], "type": "question", "language": "ar", "source": "hadith"}
            for i in range(40)]
    rows[4]["neg_ids"] = ["bukhari:5"]  # line 5: its own positive as a negative
    rows[8]["pos"], rows[8]["pos_ids"] = [], []  # line 9: no positive
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = dict(mined=False, inputs=[str(path)], held_out=None, arabic_target=1.0, conceptual_target=0.0,
                  quran_target=0.0, exact_target=None, validation_split=0)
    with pytest.raises(UserError, match=r"bad\.jsonl:5: field 'neg_ids'.*both a positive and a negative"):
        run_step(open_root(str(tmp_path / "r")), "combine", CombineConfig(**config), force=True)
    root = open_root(str(tmp_path / "r2"))
    run_step(root, "combine", CombineConfig(**config, skip_invalid=True), force=True)
    stats = json.loads(root.child("combine").read_bytes("stats.json"))
    assert stats["input"]["invalid"] == 2
    rejects = [json.loads(line) for line in root.child("combine").read_bytes("rejects.jsonl").splitlines()]
    assert [r["line"] for r in rejects] == [5, 9]
