"""Metrics on hand-made cases, each checked against a value computed by hand in the comment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raysys.evaluate.metrics import (
    gold_ranks,
    iou,
    meta_average,
    normalize_answer,
    rank_summary,
    recall_at_k,
    roc_auc,
    vqa_accuracy,
    vqa_soft_scores,
    xywh_to_xyxy,
)

# ---------------------------------------------------------------- recall@K and ranks, with ties


def test_rank_counts_a_tied_wrong_candidate_above_the_gold_one():
    # gold = column 2 (0.9); column 0 ties it, column 1 and 3 are below.
    scores = np.array([[0.9, 0.5, 0.9, 0.1]])
    gold = np.array([[False, False, True, False]])
    assert gold_ranks(scores, gold, "pessimistic").tolist() == [2.0]  # 1 + one tied non-gold
    assert gold_ranks(scores, gold, "optimistic").tolist() == [1.0]  # 1 + none strictly above
    assert gold_ranks(scores, gold, "average").tolist() == [1.5]  # expected rank, random tie-break


def test_gold_candidates_tied_with_each_other_do_not_push_each_other_down():
    # an image with two correct captions, both at the top with the same score
    assert gold_ranks(np.array([[0.7, 0.7, 0.2]]), np.array([[True, True, False]])).tolist() == [1.0]
    # best gold is the second one (0.8): only the 0.9 non-gold is above it
    s = np.array([[0.1, 0.9, 0.8, 0.3]])
    g = np.array([[True, False, True, False]])
    assert gold_ranks(s, g).tolist() == [2.0]


def test_a_constant_scorer_gets_the_worst_rank_not_the_best():
    # 5 candidates, all scored 0: pessimistic rank = 1 + 4 tied non-gold = 5
    ranks = gold_ranks(np.zeros((3, 5)), np.eye(3, 5, dtype=bool))
    assert ranks.tolist() == [5.0, 5.0, 5.0]
    assert recall_at_k(ranks, 1) == 0.0 and recall_at_k(ranks, 4) == 0.0 and recall_at_k(ranks, 5) == 100.0


def test_nan_scores_rank_last():
    ranks = gold_ranks(np.array([[np.nan, 0.2, 0.1]]), np.array([[True, False, False]]))
    assert ranks.tolist() == [3.0]


def test_recall_at_k_and_summary_by_hand():
    ranks = np.array([1, 2, 6, 11], dtype=float)
    # R@1 = 1/4, R@5 = 2/4, R@10 = 3/4; mean rank 20/4 = 5; median (2 + 6)/2 = 4
    s = rank_summary(ranks, "t2i")
    assert s == {"t2i_r1": 25.0, "t2i_r5": 50.0, "t2i_r10": 75.0, "t2i_mean_rank": 5.0, "t2i_median_rank": 4.0}


def test_rank_input_errors():
    with pytest.raises(ValueError, match="no gold"):
        gold_ranks(np.zeros((1, 3)), np.zeros((1, 3), bool))
    with pytest.raises(ValueError, match="tie_policy"):
        gold_ranks(np.zeros((1, 2)), np.array([[True, False]]), "random")


# ---------------------------------------------------------------- ROC-AUC


def test_roc_auc_by_hand_with_a_tie():
    # pos {0.9, 0.4} vs neg {0.4, 0.1}: 0.9>0.4, 0.9>0.1, 0.4=0.4 (half), 0.4>0.1 → 3.5 / 4
    assert roc_auc([0.9, 0.4], [0.4, 0.1]) == pytest.approx(0.875)
    assert roc_auc([1, 2, 3], [0, 0]) == 1.0
    assert roc_auc([0, 0], [1, 2]) == 0.0
    assert roc_auc([5, 5], [5, 5, 5]) == 0.5
    assert math.isnan(roc_auc([], [1.0]))


# ---------------------------------------------------------------- VQA accuracy (official)


def test_vqa_accuracy_with_ten_answers_by_hand():
    # The shared fixture's first question: "net" ×6, netting, mesh, pitcher, orange.
    answers = ["net", "net", "net", "netting", "net", "net", "mesh", "net", "pitcher", "orange"]
    # "net": leaving out any one of 10 humans leaves ≥ 5 "net" → min(1, ≥5/3) = 1 every time
    assert vqa_accuracy("net", answers) == 1.0
    # "netting" (1 human): left out (1 case) → 0; otherwise (9 cases) 1/3 → 9/3/10 = 0.3
    assert vqa_accuracy("netting", answers) == pytest.approx(0.3)
    assert vqa_accuracy("cat", answers) == 0.0


def test_vqa_accuracy_two_and_three_humans_and_normalisation():
    answers = ["2", "2"] + ["3"] * 8
    # "2" said by 2: left out (2 cases) → 1/3; else (8 cases) → 2/3: (2/3 + 16/3)/10 = 0.6
    assert vqa_accuracy("2", answers) == pytest.approx(0.6)
    # the prediction is normalised: number words, articles, trailing period, case
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.6)
    assert normalize_answer("Two.") == "2" and normalize_answer("the dog") == "dog" and normalize_answer("dont") == "don't"
    answers3 = ["yes"] * 3 + ["no"] * 7
    # 3 humans: left out (3 cases) → 2/3; else (7 cases) → 1: (2 + 7)/10 = 0.9
    assert vqa_accuracy("yes", answers3) == pytest.approx(0.9)
    # ≥ 4 humans → 1 whichever is left out
    assert vqa_accuracy("no", answers3) == 1.0


def test_vqa_accuracy_punctuation_of_human_answers_only_when_they_disagree():
    # Official quirk: human answers get the punctuation step only when they differ. "t-shirt" → "t shirt".
    answers = ["t-shirt"] * 4 + ["shirt"] * 6
    assert vqa_accuracy("t-shirt", answers) == 1.0
    assert vqa_accuracy("shirt", answers) == 1.0
    # unanimous answers are compared as written: the normalised prediction "t shirt" ≠ "t-shirt"
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0


def test_vqa_soft_scores_are_the_metric():
    s = vqa_soft_scores(["net"] * 6 + ["netting", "mesh", "pitcher", "orange"])
    assert s["net"] == 1.0 and s["netting"] == pytest.approx(0.3) and set(s) == {"net", "netting", "mesh", "pitcher", "orange"}


# ---------------------------------------------------------------- IoU


def test_iou_by_hand():
    # overlap 5×5 = 25; union 100 + 100 − 25 = 175
    assert iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges: no area
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    # half the box: exactly 0.5, which is NOT a hit under "IoU > 0.5"
    assert iou([0, 0, 10, 10], [0, 0, 10, 5]) == 0.5
    # broadcasting: (N,4) × (4,) and (N,4) × (M,4)
    many = np.array([[0, 0, 10, 10], [5, 5, 15, 15]])
    assert iou(many, [0, 0, 10, 10]) == pytest.approx([1.0, 25 / 175])
    assert iou(many, many).shape == (2, 2)
    assert xywh_to_xyxy([5, 5, 10, 20]) == [5.0, 5.0, 15.0, 25.0]


# ---------------------------------------------------------------- the paper's meta-average


def test_meta_average_reproduces_the_papers_tables():
    # 000 Table 1, μ-VLA_CC: VQA 72.1, NLVR2 73.4, VE 77.3, RefCOCO+ Dev 80.3 → Meta-Ave 75.8
    assert round(meta_average({"vqa": 72.1, "nlvr2": 73.4, "ve": 77.3, "refcoco": 80.3}), 1) == 75.8
    # U-VisualBERT → 70.0; Aligned VLP → 77.3; Table 6 row 20 % → 73.5
    assert round(meta_average({"vqa": 71.8, "nlvr2": 53.2, "ve": 76.8, "refcoco": 78.2}), 1) == 70.0
    assert round(meta_average({"vqa": 72.5, "nlvr2": 75.9, "ve": 78.7, "refcoco": 82.1}), 1) == 77.3
    assert round(meta_average({"vqa": 71.1, "nlvr2": 70.0, "ve": 76.4, "refcoco": 76.3}), 2) == 73.45
    # retrieval is reported but is not one of the paper's meta tasks
    assert meta_average({"vqa": 70.0, "ve": 80.0, "retrieval": 0.0}) == 75.0
