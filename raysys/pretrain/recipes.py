"""Pre-training recipes — the method and its baselines — chosen by name (paper Tables 1, 2, 5, 6 and
U-VisualBERT, `papers/001`).

A recipe says which granularity datasets feed the model, how their batches are mixed, whether the
§3.4 `w_ITM` weighting applies, and whether the optimiser steps at all:

| name | granularities | notes |
|---|---|---|
| `muvla` | `granularities` (default rt, rp, is) | the full method; any subset via the config key |
| `rt`, `rp+is`, … | that subset | shorthand for `muvla` with `granularities=[…]` |
| `base` | (muvla's, forward only) | no pre-training: losses of the initial model, no updates |
| `random_pairs` | pairs (random texts) | joint MLM+MRM on randomly paired images and texts |
| `paired_ratio` | pairs (gold, ratio r) | a fraction `paired_ratio` of true gold pairs, the rest shuffled |
| `round_robin` | text, image | U-VisualBERT: text-only MLM batches alternate with image-only MRM + tag-MLM batches; tags carry their region's box |
| `mvptr` | mvptr | MVPTR (papers/002) Eq. 5 on the retrieved pairs: mcr, vsc, wpg, itm_hard, chain-masked mlm; two-stage encoder |
| `muvla+vsc` | `granularities` | `muvla` plus VSC on the two-stage encoder's uni-modal towers (I-S positives) |
| `unimo2` | unimo2_pairs (+ unimo2_images, unimo2_texts from `unimo2.pair_epochs`) | UNIMO-2 (papers/003): grounded, span_mlm, unimo2_itm; two-stage encoder, `fusion: grounded` |
| `codis` | codis | CODIS (papers/004) Eq. 9 on the retrieved pairs: codebook, ica, itm_hard, mlm; two-stage encoder |

Register another with `@register("name")` — a function of the config returning a `Recipe`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raysys.config import ConfigError
from raysys.pretrain.config import PretrainConfig

MUVLA_GRANULARITIES = ("rt", "rp", "is")


@dataclass(frozen=True)
class Recipe:
    name: str
    granularities: tuple[str, ...]
    mixing: str
    w_itm: bool  # apply the epoch ≥ m weighting (needs the ITM head trained, i.e. I-S on)
    update: bool = True  # False: forward only (the `base` model is not pre-trained)
    options: dict[str, Any] = field(default_factory=dict)


RECIPES: dict[str, Callable[[PretrainConfig], Recipe]] = {}


def register(name: str):
    def deco(fn: Callable[[PretrainConfig], Recipe]) -> Callable[[PretrainConfig], Recipe]:
        RECIPES[name] = fn
        return fn

    return deco


def _muvla_granularities(grans) -> tuple[str, ...]:
    g = tuple(dict.fromkeys(str(x).lower().replace("-", "").replace("rn", "rp") for x in grans))
    bad = [x for x in g if x not in MUVLA_GRANULARITIES]
    if bad or not g:
        raise ConfigError(f"granularities: {list(grans)} must be a non-empty subset of {list(MUVLA_GRANULARITIES)}")
    return tuple(x for x in MUVLA_GRANULARITIES if x in g)


@register("muvla")
def muvla(cfg: PretrainConfig) -> Recipe:
    g = _muvla_granularities(cfg.granularities)
    return Recipe("muvla", g, cfg.mixing, w_itm=cfg.w_itm and "is" in g)


@register("base")
def base(cfg: PretrainConfig) -> Recipe:
    g = _muvla_granularities(cfg.granularities)
    return Recipe("base", g, cfg.mixing, w_itm=False, update=False)


@register("random_pairs")
def random_pairs(cfg: PretrainConfig) -> Recipe:
    return Recipe("random_pairs", ("pairs",), cfg.mixing, w_itm=False, options={"pairing": "random"})


@register("paired_ratio")
def paired_ratio(cfg: PretrainConfig) -> Recipe:
    if not 0.0 <= cfg.paired_ratio <= 1.0:
        raise ConfigError(f"paired_ratio: {cfg.paired_ratio} is not in [0, 1]")
    return Recipe("paired_ratio", ("pairs",), cfg.mixing, w_itm=False, options={"pairing": "gold"})


@register("round_robin")
def round_robin(cfg: PretrainConfig) -> Recipe:
    return Recipe("round_robin", ("text", "image"), "round_robin", w_itm=False)


# ---------------------------------------------------------------- MVPTR (papers/002)

MVPTR_OBJECTIVES = ("mcr", "vsc", "wpg", "itm_hard")  # + the standard `mlm` on chain-masked text


@register("mvptr")
def mvptr(cfg: PretrainConfig) -> Recipe:
    """MVPTR's full objective (its Eq. 5: VSC + MCR + MLM + ITM + WPG) on the retrieved pairs, on
    the two-stage encoder. The `mvptr` granularity is not one of the §3.4 weighted ones, so
    `w_itm` does not apply to it."""
    from raysys.pretrain import mvptr as _granularity  # noqa: F401  # lazy: registers the `mvptr` granularity; keeps recipes torch-free

    return Recipe("mvptr", ("mvptr",), cfg.mixing, w_itm=False,
                  options={"encoder": "two_stage", "objectives": MVPTR_OBJECTIVES})  # fmt: skip


@register("muvla+vsc")
def muvla_vsc(cfg: PretrainConfig) -> Recipe:
    """μ-VLA's curriculum (granularities, mixing, w_ITM) plus VSC on the two-stage encoder's
    uni-modal towers, on the I-S batches' positive pairs."""
    g = _muvla_granularities(cfg.granularities)
    if "is" not in g:
        raise ConfigError(f"recipe muvla+vsc: VSC runs on I-S batches; granularities {list(g)} have none")
    return Recipe("muvla+vsc", g, cfg.mixing, w_itm=cfg.w_itm, options={"encoder": "two_stage", "objectives": ("vsc",)})


# ---------------------------------------------------------------- CODIS (papers/004)

CODIS_OBJECTIVES = ("codebook", "ica", "itm_hard")  # + the standard `mlm` on the retrieved pairs


@register("codis")
def codis(cfg: PretrainConfig) -> Recipe:
    """CODIS's objective (its Eq. 9: L_code + L_ica + ITM with contrastive hard negatives + MLM) on
    the retrieved pairs (the `codis` granularity of `raysys.pretrain.codis`), on the two-stage
    encoder; hyper-parameters in `cfg.codis`. The `codis` granularity is not one of the §3.4
    weighted ones: no w_ITM curriculum."""
    from raysys.pretrain import codis as _objectives  # noqa: F401  # lazy: registers the codis objectives and granularity; keeps recipes torch-free

    return Recipe("codis", ("codis",), cfg.mixing, w_itm=False,
                  options={"encoder": "two_stage", "objectives": CODIS_OBJECTIVES})  # fmt: skip


# ---------------------------------------------------------------- UNIMO-2 (papers/003)

UNIMO2_GRANULARITIES = ("unimo2_pairs", "unimo2_images", "unimo2_texts")
UNIMO2_OBJECTIVES = ("grounded", "span_mlm", "unimo2_itm")


@register("unimo2")
def unimo2(cfg: PretrainConfig) -> Recipe:
    """UNIMO-2: grounded learning (L_GD), span MLM and ITM through the Grounded Transformer
    (`fusion: grounded`) on the two-stage encoder. Its corpus curriculum (§3.1): the retrieved
    pairs alone for `unimo2.pair_epochs` epochs, then pairs, images alone and texts alone
    (`options["join_epoch"]`: the epoch from which each granularity is mixed in; `joined`)."""
    from raysys.pretrain import unimo2 as _granularities  # noqa: F401  # lazy: registers the unimo2 granularities; keeps recipes torch-free

    pe = int(cfg.unimo2.pair_epochs)
    if pe < 0:
        raise ConfigError(f"unimo2.pair_epochs: {pe} must be ≥ 0")
    return Recipe("unimo2", UNIMO2_GRANULARITIES, cfg.mixing, w_itm=False,
                  options={"encoder": "two_stage", "fusion": "grounded", "objectives": UNIMO2_OBJECTIVES,
                           "join_epoch": {"unimo2_images": pe, "unimo2_texts": pe}})  # fmt: skip


def joined(recipe: Recipe, epoch: int) -> tuple[str, ...]:
    """The recipe's granularities mixed in epoch `epoch`: those whose `join_epoch` (absent = 0)
    has come; the curriculum of a recipe that adds corpora over time (`unimo2`)."""
    start = recipe.options.get("join_epoch", {})
    return tuple(g for g in recipe.granularities if epoch >= int(start.get(g, 0)))


def model_overrides(cfg: PretrainConfig) -> dict[str, Any]:
    """What the config's recipe sets on the model: `encoder`, `uni_layers` and `objectives` (the
    registered objectives it adds to the standard ones). A recipe that needs the two-stage encoder
    (`mvptr`, `muvla+vsc`) turns `encoder: single` into `two_stage`, with `uni_layers` or, when
    that is 0, half the backbone's layers (-1, resolved by the model)."""
    r = resolve(cfg)
    encoder = getattr(cfg, "encoder", "single")
    uni = getattr(cfg, "uni_layers", 0)
    if encoder == "single" and r.options.get("encoder") == "two_stage":
        encoder, uni = "two_stage", uni or -1
    fusion = r.options.get("fusion", getattr(cfg, "fusion", "full"))
    return {"encoder": encoder, "uni_layers": uni, "objectives": tuple(r.options.get("objectives", ())),
            "fusion": fusion}  # fmt: skip


def resolve(cfg: PretrainConfig) -> Recipe:
    name = cfg.recipe
    if name in RECIPES:
        return RECIPES[name](cfg)
    parts = name.replace(",", "+").split("+")
    if all(p.lower().replace("-", "") in (*MUVLA_GRANULARITIES, "rn") for p in parts):
        g = _muvla_granularities(parts)
        return Recipe("+".join(g), g, cfg.mixing, w_itm=cfg.w_itm and "is" in g)
    raise ConfigError(f"recipe: unknown {name!r}; known: {sorted(RECIPES)} or a '+'-joined subset of {list(MUVLA_GRANULARITIES)}")
