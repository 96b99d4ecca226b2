"""The pre-training configs: `PretrainConfig` (every knob of the local loop and of the core the Ray
Train loop reuses) and `TrainConfig` (the same plus the Ray Train run settings).

Config dataclasses only, importing nothing heavy: the CLI, recipes, sweeps and Tune read them
without pulling in torch. Closed sets are `Literal`s, so `raysys.config` refuses a typo when the
YAML or a `key=value` override is loaded, before any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mixing = Literal["round_robin", "proportional", "joint"]  # raysys.pretrain.curriculum.MIXERS
Pooling = Literal["auto", "cls", "mean"]  # raysys.pretrain.model.POOLINGS
RegionInit = Literal["random", "tags"]  # raysys.pretrain.region_init
Input = Literal["stream", "memory"]  # raysys.pretrain.stream (default) | granularities.load_corpus (bench baseline)


@dataclass
class CodisConfig:
    """CODIS (papers/004) hyper-parameters, read by the `codebook` and `ica` objectives (the paper's
    defaults; each field cites its equation)."""

    codewords: int = 4096  # K, codewords of the codebook C (§3.1, Eq. 1–3: "4K")
    dim: int = 256  # d_c, the joint space of the projected features and the codewords (§3.1, §3.2)
    ema: float = 0.995  # α of the momentum teachers (Eq. 6)
    queue_size: int = 65536  # M, teacher features per modality in the memory queues Q_v, Q_t (Eq. 4; §4.2)
    temperature: float = 0.07  # γ of Eq. 2 and 4 (Algorithm 1's learnable `tmp`; ALBEF's initial value)
    learn_temperature: bool = True  # γ is learned (Algorithm 1), clamped to [0.001, 0.5] as in ALBEF
    ot_weight: float = 1.0  # weight of the OT regulariser L_ot in L_code (Eq. 3: 1)
    ipot_eps: float = 0.5  # ε (β) of IPOT, A = exp(-D/ε) (Algorithm 2; not stated: UNITER's IPOT β)
    ipot_iters: int = 50  # IPOT outer iterations (Algorithm 2; not stated: UNITER's 50)
    ipot_inner: int = 1  # IPOT inner Sinkhorn steps per iteration (Algorithm 2's K; UNITER's 1)
    distill: float = 0.4  # share of the teacher's soft targets y in Eq. 5's targets (rest: the true pair; ALBEF's 0.4)


@dataclass
class MvptrConfig:
    """MVPTR (papers/002) options, read by the `wpg` objective (the paper's settings by default)."""

    # WPG's negative image (§3.3). hard: drawn from p_s2v of Eq. 1, the cross-modal layers run again on
    # (V_i', S_i) (the paper). in_batch: a uniform other image of the batch, its regions and S_i's
    # phrases each from their own pair's pass (the official code's default, `--wra_mod sample`).
    wpg_negative: Literal["hard", "in_batch"] = "hard"


@dataclass
class Unimo2Config:
    """UNIMO-2 (papers/003) hyper-parameters, read by the `grounded` and `span_mlm` objectives, the
    grounded fusion and the `unimo2` recipe's corpus curriculum (the paper's defaults; each field
    cites its equation)."""

    dictionary_size: int = 2048  # C: entries of the grounded dictionary G ∈ R^{C×D} (§3.1; §4.1 and App. A: 2048)
    grounded_k: int = 100  # K: top-K grounded tokens by accumulated score s_j (Eq. 2; §4.1: 100)
    beta: float = 0.25  # β: weight of the commitment term of L_GD (Eq. 3; §4.1: 0.25)
    eta_init: float = 0.0  # η of Eq. 1 is learnable; the paper gives no start value: 0 = 1/√D (η·uᵀg ~ N(0, 1) at init)
    span_p: float = 0.2  # span MLM: span length l ~ Geo(p) (§3.2: p = 0.2, after SpanBERT)
    max_span: int = 10  # span MLM: lengths above this are resampled (SpanBERT's l_max = 10, which §3.2 follows)
    mask_budget: float = 0.15  # span MLM: spans are drawn until this share of the tokens is selected (§3.2: 15 %)
    pair_epochs: int = 20  # curriculum: epochs on (retrieved) pairs before images and texts alone join (§3.1: 20)


@dataclass
class PretrainConfig:
    """Every knob of pre-training; Tune addresses them by name (`m`, `granularities`, `k`, …)."""

    recipe: str = "muvla"  # see raysys.pretrain.recipes: muvla, base, random_pairs, paired_ratio, round_robin, rt+rp, …
    granularities: list[str] = field(default_factory=lambda: ["rt", "rp", "is"])  # muvla's subset
    mixing: Mixing = "round_robin"  # round_robin | proportional | joint (raysys.pretrain.curriculum)
    m: int = 1  # epoch from which w_ITM weights R-P and I-S (paper: 1)
    w_itm: bool = True  # the §3.4 weighting on/off (Table 4)
    k: int = 5  # use retrieved pairs with rank < k (one top-max(K) retrieval serves a K sweep)
    paired_ratio: float = 0.0  # paired_ratio recipe: fraction r of true gold pairs
    # masking
    mlm_prob: float = 0.15  # sentence tokens (I-S, text-only, pairs)
    mrm_prob: float = 0.15  # regions of the pairs baseline
    rt_tag_mask_prob: float = 0.15  # R-T: tags (whole tags)
    rt_region_mask_prob: float = 0.15  # R-T: regions
    # of the regions chosen for MRM (mrm_prob, rt_region_mask_prob), the share left unmasked yet still
    # predicted, as BERT keeps 10 % of its chosen tokens; 0 = the paper's (UNITER's): every one zeroed
    mrm_keep_ratio: float = 0.0
    rp_mask_scale: float = 1.0  # R-P: a link is masked with min(1, scale · link_score)
    rp_text_prob: float = 0.5  # R-P: probability a sample masks the phrase side (else the region side)
    is_neg_prob: float = 0.5  # I-S: share of negatives (random image)
    # data
    max_text_len: int = 40  # tokens including [CLS] and [SEP]
    max_regions: int = 36
    max_images: int = 0  # use only the first N eligible images (0 = all); for debugging/overfit
    exclude_eval: bool = True  # keep gold "eval" images out of pre-training
    num_classes: int = 0  # MRC classes; 0 = len(manifest tag_vocab)
    input: Input = "stream"  # stream: examples/ windows (raysys.pretrain.stream); memory: the whole shard in dicts (bench baseline)
    window_images: int = 256  # stream: images per window; batches, ITM negatives and the in-window shuffle come from one window
    data_cpus: float = 0.5  # stream on Ray Train: Ray CPUs of each Ray Data actor that reads, tokenises, masks and collates
    data_actors: int = 1  # stream on Ray Train: Ray Data actors per training worker
    prefetch_steps: int = 2  # stream on Ray Train: collated steps a worker keeps ready (Ray Data prefetch_batches)
    # model
    model_path: str = ""  # any HF BERT folder; "" = the packaged MiniLM
    model_layers: int = 0  # keep the first N encoder layers (0 = all)
    dropout: float | None = None  # None = the checkpoint's
    pooling: Pooling = "auto"  # ITM head input: cls | mean | auto (the backbone's own; mean for MiniLM)
    region_init: RegionInit = "random"  # random (paper) | tags: ridge map from region features to tag words (raysys.pretrain.region_init)
    region_init_ridge: float = 1.0  # λ of that ridge regression
    region_init_max_regions: int = 50000  # seeded sample of tagged regions the fit reads (0 = all)
    extra_objectives: list[str] = field(default_factory=list)  # registered objectives beyond the standard five
    loss_weights: dict[str, float] = field(default_factory=dict)  # objective → factor on its loss (absent = 1)
    encoder: Literal["single", "two_stage"] = "single"  # two_stage: uni-modal layers, then cross-modal (MVPTR)
    uni_layers: int = 0  # two_stage: backbone layers run per modality before the concatenation
    fusion: Literal["full", "grounded"] = "full"  # grounded (UNIMO-2): text and regions meet only through grounded tokens
    codis: CodisConfig = field(default_factory=CodisConfig)  # recipe codis
    unimo2: Unimo2Config = field(default_factory=Unimo2Config)  # recipe unimo2
    mvptr: MvptrConfig = field(default_factory=MvptrConfig)  # recipe mvptr
    min_concept_count: int = 50  # mvptr: a phrase concept is kept when ≥ this many sentences have it (MVPTR: 50)
    # optimisation
    batch_size: int = 32
    lr: float = 6e-5  # paper's peak
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    steps: int = 0  # 0 = epochs × steps_per_epoch
    epochs: int = 1
    steps_per_epoch: int = 0  # 0 = from the mixer (one pass over the granularity data)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    log_every: int = 10


@dataclass
class TrainConfig(PretrainConfig):
    """`PretrainConfig` plus the Ray Train run settings: one flat namespace, so a YAML file or
    `key=value` override addresses model, data, optimisation and cluster knobs alike, and Tune can
    sweep any of them."""

    workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool | None = None  # None = GPUs when the cluster has any
    cpus_per_worker: float = 1.0  # Ray CPUs per worker; on CPU also torch's thread count (unless `threads`)
    grad_accum: int = 1  # micro-batches per optimiser step
    bf16: bool = True  # CUDA only: bf16 autocast (CPU trains in float32)
    compile: bool = False  # CUDA only: torch.compile the encoder
    checkpoint_every: int = 0  # optimiser steps between checkpoints (0 = epoch ends only)
    keep_checkpoints: int = 2  # CheckpointConfig(num_to_keep)
    max_failures: int = 1  # FailureConfig(max_failures): worker-group restarts from the latest checkpoint
    storage: str = ""  # Ray Train storage (dir or s3://, gs://); "" = the CLI's --storage / the pipeline's OUT/train
    tracking_uri: str = ""  # MLflow; "" = sqlite:///<storage or --out>/mlflow.db, "none" = off
    experiment: str = "raysys-pretrain"  # MLflow experiment
    stop_after_epochs: int = 0  # end this invocation after N more epochs (a re-run continues); 0 = run to the end
    fail_at_step: int = 0  # failure drill: the last rank SIGKILLs itself at this step, once per invocation (0 = off)
