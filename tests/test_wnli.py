"""WNLI candidate competition (finetune/stages/wnli.py, experiments/wnli.py) on the real WNLI files; its wiring
into runs and sweeps."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vegalm.data.glue import Example, load_split
from vegalm.errors import VegaError
from vegalm.experiments.wnli import premise_folds
from vegalm.finetune.config import FinetuneConfig, config_hash, resolve
from vegalm.finetune.models import minilm_path
from vegalm.finetune.run import run_finetune
from vegalm.finetune.stages.wnli import GroupPrior, apply_treatment, premise_key, rank_predictions
from _data import GLUE_DIR, needs_glue

pytestmark = needs_glue


class _NoLabel(Example):
    """A row whose label raises: the ranking must decide from texts and logits only."""

    def __getattribute__(self, name):
        if name == "label":
            raise AssertionError("the label of an evaluated row was read")
        return super().__getattribute__(name)


def _hidden(rows):
    return [_NoLabel(ex.guid, ex.index, ex.text_a, ex.text_b, ex.label) for ex in rows]


def test_group_prior_from_the_real_train_split():
    prior = GroupPrior.from_train(load_split("wnli", "train", GLUE_DIR))
    # counted in the docstring: pairs have one entailed, triples one, quadruples two
    assert prior.k(2) == 1 and prior.k(3) == 1 and prior.k(4) == 2
    assert 0.4 < prior.share < 0.6 and prior.k(6) == round(6 * prior.share)
    with pytest.raises(VegaError, match="labelled"):
        GroupPrior.from_train(_hidden(load_split("wnli", "train", GLUE_DIR))[:0] + [Example("g", 0, "a", "b", None)])


def test_ranking_rules_on_a_hand_made_group():
    ex = [Example("t-0", 0, "Tom thanked Bob because he helped.", "Tom helped.", None),
          Example("t-1", 1, "Tom  thanked Bob because he helped.", "Bob helped.", None),  # same premise (spaces)
          Example("t-2", 2, "A lone premise.", "A hypothesis.", None)]
    logits = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])  # all lean entailed; row 1 most
    prior = GroupPrior({2: 1, 3: 1}, 0.5)
    pred, counts = rank_predictions(logits, ex, prior)
    assert pred.tolist() == [0, 1, 1] and counts == {"ranked": 2, "by_train": 0, "argmax": 1}
    # a train hypothesis of the same premise, entailed, takes the one slot of the group of 3
    train = [Example("tr", 0, "Tom thanked Bob because he helped.", "Bob's help.", 1)]
    pred, counts = rank_predictions(logits, ex, prior, train=train)
    assert pred.tolist() == [0, 0, 1] and counts["by_train"] == 2
    with pytest.raises(VegaError, match=r"\[N, 2\]"):
        rank_predictions(np.zeros((3, 3)), ex, prior)
    with pytest.raises(VegaError, match="wnli_treatment"):
        apply_treatment("vote", logits, ex, train)
    majority, _ = apply_treatment("majority", logits, ex, load_split("wnli", "train", GLUE_DIR))
    assert majority.tolist() == [0, 0, 0]  # train: 323 not_entailment vs 312


def test_treatments_on_real_dev_never_read_eval_labels():
    train = load_split("wnli", "train", GLUE_DIR)
    dev = load_split("wnli", "dev", GLUE_DIR)
    gold = np.array([ex.label for ex in dev])
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(dev), 2))  # an uninformed model
    plain, c0 = apply_treatment("none", logits, _hidden(dev), train)
    groups, c1 = apply_treatment("groups", logits, _hidden(dev), train)
    linked, c2 = apply_treatment("groups+train", logits, _hidden(dev), train)
    assert c0["argmax"] == 71 and c1["ranked"] == 14 and c1["argmax"] == 57  # 7 dev premises have 2 rows, 57 have 1
    assert c2["by_train"] == 65  # 61 of 64 dev premises occur in train
    acc = {k: float(np.mean(p == gold)) for k, p in (("none", plain), ("groups", groups), ("linked", linked))}
    # train labels decide most dev rows: far above the 56.3% floor even with random logits
    assert acc["linked"] > 0.8 and acc["none"] < 0.7
    assert np.array_equal(plain, logits.argmax(-1))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from vegalm.model import EncoderConfig, VegaModel

    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    VegaModel(EncoderConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, position_buckets=32)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, path / name)
    return path


def test_finetune_writes_treated_predictions_and_report(tiny_dir, tmp_path, fresh_accelerate):
    base = dict(task="wnli", model=str(tiny_dir), glue_dir=str(GLUE_DIR), max_steps=2, batch_size=16,
                progress=False, save_model=False)
    res = run_finetune(FinetuneConfig.of(**base, out=str(tmp_path / "w"), wnli_treatment="groups+train"))
    rep = res["wnli"]
    assert rep["treatment"] == "groups+train" and rep["dev"]["majority_floor"] == 56.34
    assert rep["dev"]["accuracy"] == round(res["dev"]["dev"]["accuracy"], 2)
    assert rep["dev"]["accuracy_by_treatment"]["majority"] == rep["dev"]["majority_floor"]
    assert rep["dev"]["decided"]["by_train"] == 65 and rep["test"]["decided"]["argmax"] == 0  # every test premise has 2+
    dev_logits = np.load(tmp_path / "w" / "dev_logits.npy")
    assert rep["dev"]["accuracy_argmax"] == round(100 * float(np.mean(
        dev_logits.argmax(-1) == [e.label for e in load_split("wnli", "dev", GLUE_DIR)])), 2)
    with open(tmp_path / "w" / "test_predictions.tsv", encoding="utf-8") as f:
        written = [int(r["prediction"]) for r in csv.DictReader(f, delimiter="\t")]
    test_logits = np.load(tmp_path / "w" / "test_logits.npy")
    want, _ = apply_treatment("groups+train", test_logits, load_split("wnli", "test", GLUE_DIR),
                              load_split("wnli", "train", GLUE_DIR))
    assert written == want.tolist()
    # the key changes the cache key of a WNLI run only
    k = {t: {v: config_hash(resolve(FinetuneConfig.of(**{**base, "task": t}, out="o", wnli_treatment=v)))
             for v in ("none", "groups")} for t in ("wnli", "rte")}
    assert k["wnli"]["none"] != k["wnli"]["groups"] and k["rte"]["none"] == k["rte"]["groups"]


def test_glue_sweep_submission_follows_the_treatment(tiny_dir, tmp_path, fresh_accelerate):
    from vegalm.experiments.glue import run_glue
    from vegalm.experiments.submission import read_submission

    res = run_glue(str(tiny_dir), "wnli", 1, tmp_path / "g", glue_dir=str(GLUE_DIR), max_steps=2, batch_size=16,
                   progress=False, wnli_treatment="groups")
    run_dir = tmp_path / "g" / "wnli" / "seed0"
    logits = np.load(run_dir / "test_logits.npy")
    want, _ = apply_treatment("groups", logits, load_split("wnli", "test", GLUE_DIR), load_split("wnli", "train", GLUE_DIR))
    sub = dict(read_submission(tmp_path / "g" / "submission.zip")["WNLI"])
    test = load_split("wnli", "test", GLUE_DIR)
    assert [int(sub[ex.index]) for ex in test] == want.tolist()
    assert json.loads((run_dir / "results.json").read_text())["wnli"]["treatment"] == "groups"
    assert want.tolist() != logits.argmax(-1).tolist()  # so the check above can tell the two apart
    assert res["glue"]["median"]["task_scores"]


def test_premise_folds_are_disjoint_and_complete(tmp_path):
    dirs = premise_folds(GLUE_DIR, tmp_path, folds=2, seed=0)
    train = load_split("wnli", "train", GLUE_DIR)
    seen = []
    for d in dirs:
        tr, dv = load_split("wnli", "train", d), load_split("wnli", "dev", d)
        assert len(tr) + len(dv) == len(train)
        assert not {premise_key(e.text_a) for e in tr} & {premise_key(e.text_a) for e in dv}
        seen += [(e.text_a, e.text_b, e.label) for e in dv]
    assert sorted(seen) == sorted((e.text_a, e.text_b, e.label) for e in train)  # each row held out once
    assert premise_folds(GLUE_DIR, tmp_path, folds=2, seed=0) == dirs  # same folds again, files untouched
