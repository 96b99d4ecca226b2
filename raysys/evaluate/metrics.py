"""Evaluation metrics: retrieval recall@K and ranks, ROC-AUC, the official VQA accuracy, IoU, and
the paper's meta-average.

Each metric is a small pure function on numpy arrays, tested on hand-made cases
(`tests/test_metrics.py`), because a wrong metric silently invalidates every table built on it.

**Tie policy of the ranking metrics (pessimistic).** A query's rank is
`1 + #{non-gold candidates scoring >= the best gold candidate}`: a wrong candidate that ties the
gold one is counted as ranked above it. Why: a degenerate scorer that gives every pair the same
score must get R@K = 0 (chance or worse), never 100 %. Gold candidates tied with each other do not
push each other down (an image has five correct captions; any of them at the top is a hit).
`tie_policy="optimistic"` counts only strictly higher non-gold candidates, and `"average"` is the
mean of the two, i.e. the expected rank when ties are broken uniformly at random.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np

TiePolicy = Literal["pessimistic", "optimistic", "average"]
TIE_POLICIES: tuple[str, ...] = get_args(TiePolicy)


# ---------------------------------------------------------------- retrieval


def gold_ranks(scores: np.ndarray, gold: np.ndarray, tie_policy: TiePolicy = "pessimistic") -> np.ndarray:
    """1-based rank of the best-ranked gold candidate for every query (row).

    `scores` (Q, C) float, `gold` (Q, C) bool with at least one True per row. Non-finite scores
    rank last (a NaN never counts as a hit). See the module docstring for the tie policy.
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy {tie_policy!r} is not one of {TIE_POLICIES}")
    s = np.where(np.isfinite(scores), scores, -np.inf).astype(np.float64)
    gold = np.asarray(gold, dtype=bool)
    if s.shape != gold.shape:
        raise ValueError(f"scores {s.shape} and gold {gold.shape} differ in shape")
    if not gold.any(axis=1).all():
        raise ValueError(f"query {int(np.argmin(gold.any(axis=1)))} has no gold candidate")
    best = np.where(gold, s, -np.inf).max(axis=1, keepdims=True)
    non_gold = ~gold
    above = (non_gold & (s > best)).sum(axis=1)
    tied = (non_gold & (s == best)).sum(axis=1)
    if tie_policy == "pessimistic":
        return (1 + above + tied).astype(np.float64)
    if tie_policy == "optimistic":
        return (1 + above).astype(np.float64)
    return 1 + above + tied / 2.0


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percent of queries whose gold candidate is within the top k (rank <= k)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) == 0:
        return float("nan")
    return float(100.0 * np.mean(ranks <= k))


def rank_summary(ranks: np.ndarray, prefix: str, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`{prefix_r1, prefix_r5, prefix_r10, prefix_mean_rank, prefix_median_rank}`."""
    out = {f"{prefix}_r{k}": recall_at_k(ranks, k) for k in ks}
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks)) if len(ranks) else float("nan")
    out[f"{prefix}_median_rank"] = float(np.median(ranks)) if len(ranks) else float("nan")
    return out


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve = P(score(pos) > score(neg)) + 0.5 · P(tie) (Mann–Whitney U).

    Exact, by ranks with average ties; no sklearn needed.
    """
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    sorted_v = allv[order]
    # average rank (1-based) over runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], len(allv)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


# ---------------------------------------------------------------- VQA accuracy (official)

# From the official evaluation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official normalisation of a predicted answer: whitespace, punctuation, number words,
    articles, contractions ("Two dogs." -> "2 dogs")."""
    a = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digit_article(_punctuation(a))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the human answers (usually 10).

    For each human i: `min(1, #{other humans j != i whose answer == prediction} / 3)`, averaged over
    the humans — i.e. `min(#humans that said it / 3, 1)` averaged over the 10-choose-9 subsets.
    As in the official code, the prediction is always normalised; the human answers get the
    punctuation step only, and only when they disagree among themselves.
    """
    if not answers:
        raise ValueError("vqa_accuracy: no ground-truth answers")
    pred = normalize_answer(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        accs.append(min(1.0, matches / 3.0))
    return float(sum(accs) / len(accs))


def vqa_soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft target of every distinct answer = its own VQA accuracy (1 → 0.3, 2 → 0.6, 3 → 0.9,
    ≥ 4 → 1 with 10 humans: the BUTD/UNITER targets are exactly the metric)."""
    return {a: vqa_accuracy(a, answers) for a in dict.fromkeys(normalize_answer(x) for x in answers)}


# ---------------------------------------------------------------- boxes


def iou(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Intersection over union of xyxy boxes in continuous pixel coordinates (area = (x2-x1)(y2-y1),
    no +1). Broadcasts: (4,) × (4,) → float, (N,4) × (4,) → (N,), (N,4) × (M,4) → (N,M)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scalar = a.ndim == 1 and b.ndim == 1
    a2 = a.reshape(-1, 4)[:, None, :]
    b2 = b.reshape(-1, 4)[None, :, :]
    iw = np.clip(np.minimum(a2[..., 2], b2[..., 2]) - np.maximum(a2[..., 0], b2[..., 0]), 0, None)
    ih = np.clip(np.minimum(a2[..., 3], b2[..., 3]) - np.maximum(a2[..., 1], b2[..., 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a2[..., 2] - a2[..., 0], 0, None) * np.clip(a2[..., 3] - a2[..., 1], 0, None)
    area_b = np.clip(b2[..., 2] - b2[..., 0], 0, None) * np.clip(b2[..., 3] - b2[..., 1], 0, None)
    union = area_a + area_b - inter
    out = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    if scalar:
        return float(out[0, 0])
    if b.ndim == 1:
        return out[:, 0]
    if a.ndim == 1:
        return out[0]
    return out


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """COCO/RefCOCO `[x, y, w, h]` → `[x1, y1, x2, y2]`."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


# ---------------------------------------------------------------- classification and the paper's tables


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Percent correct."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float(100.0 * np.mean(pred == labels)) if len(labels) else float("nan")


#: The four tasks of the paper's Meta-Ave column (000 Tables 1-6), in table order. RefCOCO+ enters
#: with its first split (Dev): with that choice every Meta-Ave of Tables 1-6 is reproduced within
#: the printed 0.1 (e.g. μ-VLA_CC: (72.1 + 73.4 + 77.3 + 80.3) / 4 = 75.78 → 75.8; only Base,
#: 65.975 printed as 65.9, looks computed from unrounded scores).
META_TASKS = ("vqa", "nlvr2", "ve", "refcoco")
#: what each of them scores by guessing on the demo world's suite (percent), for the report's chance
#: lines: VQA is open-ended; NLVR2 is balanced; VE is 1 : 1 : 2 entailment : neutral : contradiction,
#: so that a hypothesis alone tells nothing (raysys.data.world); RefCOCO+ picks one of the world's
#: 7.5 regions on average (3-12 uniform)
CHANCE = {"vqa": 0.0, "nlvr2": 50.0, "ve": 50.0, "refcoco": 100 / 7.5}


def meta_average(scores: Mapping[str, float], tasks: Sequence[str] = META_TASKS) -> float:
    """Unweighted mean of the headline score (percent) of the meta tasks present in `scores`."""
    vals = [float(scores[t]) for t in tasks if t in scores and scores[t] is not None]
    return float(np.mean(vals)) if vals else float("nan")
