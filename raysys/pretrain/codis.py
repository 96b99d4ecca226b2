"""CODIS (papers/004, §3): a codebook that bridges the modalities, and teacher–student distillation.

Both losses work in a d-dim joint space (paper: 256) of the two-stage encoder's uni-modal tower
embeddings (`model.tower_embeddings`, the ones `coarse=towers` zero-shot ranks with), projected by
`text_proj` / `image_proj` and L2-normalised. Momentum **teachers** — EMA copies (α = 0.995, Eq. 6)
of the towers' weights (BERT embeddings, the uni-modal text layers, the region embedding, the
visual layers) and of the two projections — give the features the targets come from:

* `codebook` (L_code, Eq. 1–3): the teacher features of each modality are transported to the K
  codewords by IPOT (Algorithm 2, `ipot`); each modality's student prototype similarities
  `softmax(z · C / γ)` are trained towards the **other** modality's plan (L_tp: text students vs the
  image plan, L_ip: image students vs the text plan, as the text and Fig. 3 say; Algorithm 1's
  pseudo-code pairs same-modality terms), each plan row normalised to a distribution; plus the OT
  regulariser L_ot = ⟨T, D⟩ (Eq. 1, D = 1 − cos, gradient into the codebook), weight `ot_weight`.
* `ica` (L_ica, Eq. 4–5): students against memory queues of teacher features (the batch's own
  teacher features first, as ALBEF does), t2t, i2i, t2i and i2t, cross-entropy to soft targets
  `distill · softmax(teacher similarities / γ) + (1 − distill) · ground truth` (ALBEF's momentum
  distillation, which CODIS extends; ground truth: the pair itself and other texts of the same
  image in the batch).

γ is one learnable temperature (Algorithm 1's `tmp`, ALBEF's init 0.07, clamped to [0.001, 0.5]).
Per-sample losses, as the objective seam wants: sample i's L_ot is N·Σ_j T_ij D_ij (their batch
mean is ⟨T, D⟩). `codebook` also logs `codebook_usage`: the share of codewords that receive at
least 1 % of the plan mass once each teacher feature's plan row is rounded to its largest entry
(the raw plan gives every codeword exactly ν_j = 1/K by its column constraint, which says nothing).

**Where the state lives.** The projections, the codebook, γ and the teachers belong to the first of
`codebook` / `ica` in the model's objective list (`JointSpace`); the queues to `ica`. All of it is
in `model.objectives`, hence in checkpoints: a resumed run continues with the same teachers and
queues. Teachers and queues are **buffers**, never parameters: the optimiser and DDP's gradient
reduction skip them, and Ray Train wraps DDP without the per-forward buffer broadcast
(`ray_train._no_buffer_sync`). They stay identical across ranks by construction: the teachers are
copies of identical initial students, updated in `after_update` from the all-reduced students;
each step's teacher features of **every** rank are all-gathered (`after_update`, called on every
rank in the same order) and enqueued in rank order, as ALBEF does. Nothing is enqueued outside a
training step (`after_update` only runs after an optimiser step).

Importing this module registers the objectives `codebook` and `ica` and the granularity `codis`
(retrieved pairs with MLM and `image_index`, no concepts: the towers see what `coarse=towers`
zero-shot gives them); the `codis` recipe imports it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from raysys.pretrain.granularities import GRANULARITIES, GranularityDataset, Sample, assemble, pair_samples
from raysys.pretrain.objectives import Objective, ObjectiveOutput, _towers, register

CODIS_GRANULARITIES = ("codis",)
JOINT_OWNERS = ("codebook", "ica")  # the first of these the model builds owns the JointSpace
USAGE_THRESHOLD = 0.01  # codebook_usage: a codeword is used when it gets ≥ 1 % of the plan mass
TEMPERATURE_RANGE = (0.001, 0.5)  # ALBEF's clamp of the learnable temperature


# ---------------------------------------------------------------- IPOT (Algorithm 2)


def ipot(cost: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, eps: float, iters: int, inner: int = 1) -> torch.Tensor:
    """IPOT (Xie et al.; CODIS Algorithm 2): the proximal-point OT plan of `cost` (..., N, K) with
    marginals `mu` (..., N) and `nu` (..., K). Each outer iteration is a Sinkhorn projection of
    `A ⊙ T` (A = exp(−D/ε)) onto the marginals, `inner` times; the proximal term makes it converge
    to the exact (unregularised) optimum as `iters` grows, for any ε. The paper's `δ = μ/(nQσ)`
    reads μ as counts (uniform μ = 1); with probability vectors it is `δ = μ/(Qσ)`. The last
    update is σ's, so the column marginals are exact; rows converge. No gradient (a target)."""
    with torch.no_grad():
        A = torch.exp(-cost / eps)
        T = torch.ones_like(A)
        sigma = torch.ones_like(nu) / nu.shape[-1]
        delta = mu
        tiny = torch.finfo(A.dtype).tiny
        for _ in range(iters):
            Q = A * T
            for _ in range(inner):
                delta = mu / (Q @ sigma.unsqueeze(-1)).squeeze(-1).clamp(min=tiny)
                sigma = nu / (Q.transpose(-1, -2) @ delta.unsqueeze(-1)).squeeze(-1).clamp(min=tiny)
            T = delta.unsqueeze(-1) * Q * sigma.unsqueeze(-2)
        return T


# ---------------------------------------------------------------- the losses, on features


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """H(p, y) per row: −Σ_j y_j log softmax(logits)_j (Algorithm 1's `H`, target detached)."""
    return -(target.detach() * F.log_softmax(logits, dim=-1)).sum(-1)


def codebook_per_sample(z_t: torch.Tensor, z_v: torch.Tensor, zt_m: torch.Tensor, zv_m: torch.Tensor,
                        codebook: torch.Tensor, temperature: torch.Tensor | float, eps: float, iters: int,
                        inner: int = 1, ot_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """L_code (Eq. 3) per sample from unit features (N, d): students `z_t`, `z_v`, teachers `zt_m`,
    `zv_m`, codewords `codebook` (K, d; normalised here). Returns (loss (N,), parts): the
    parts are the per-sample `tp`, `ip`, `ot_t`, `ot_v` and the plans `plan_t`, `plan_v` (N, K)."""
    C = F.normalize(codebook.float(), dim=-1)
    N, K = zt_m.shape[0], C.shape[0]
    D_t, D_v = 1.0 - zt_m.float() @ C.t(), 1.0 - zv_m.float() @ C.t()  # Eq. 1: d = 1 − cos
    mu = torch.full((N,), 1.0 / N, device=C.device)
    nu = torch.full((K,), 1.0 / K, device=C.device)
    plan_t = ipot(D_t.detach(), mu, nu, eps, iters, inner)
    plan_v = ipot(D_v.detach(), mu, nu, eps, iters, inner)
    y_t = plan_t / plan_t.sum(-1, keepdim=True)
    y_v = plan_v / plan_v.sum(-1, keepdim=True)
    tp = soft_cross_entropy(z_t.float() @ C.t() / temperature, y_v)  # Eq. 2: text students vs the image plan
    ip = soft_cross_entropy(z_v.float() @ C.t() / temperature, y_t)  # … image students vs the text plan
    ot_t = N * (plan_t * D_t).sum(-1)  # Eq. 1 per sample: its mean over the batch is ⟨T, D⟩
    ot_v = N * (plan_v * D_v).sum(-1)
    loss = tp + ip + ot_weight * (ot_t + ot_v)
    return loss, {"tp": tp, "ip": ip, "ot_t": ot_t, "ot_v": ot_v, "plan_t": plan_t, "plan_v": plan_v}


def codebook_usage(*plans: torch.Tensor, threshold: float = USAGE_THRESHOLD) -> torch.Tensor:
    """The share of codewords receiving ≥ `threshold` of the plans' mass when each row (one
    teacher feature) goes whole to its largest entry."""
    K = plans[0].shape[-1]
    counts = torch.cat([torch.bincount(p.argmax(-1), minlength=K) for p in plans]).view(len(plans), K).sum(0)
    return (counts.float() / counts.sum().clamp(min=1) >= threshold).float().mean()


def ica_targets(sim_m: torch.Tensor, positives: torch.Tensor, distill: float) -> torch.Tensor:
    """Soft targets: `distill · softmax(teacher logits) + (1 − distill) · positives` (rows of
    `positives` normalised; the queue columns are never positive)."""
    gt = positives.float() / positives.float().sum(-1, keepdim=True).clamp(min=1.0)
    return distill * torch.softmax(sim_m.float(), -1) + (1.0 - distill) * gt


def ica_per_sample(z_t: torch.Tensor, z_v: torch.Tensor, zt_m: torch.Tensor, zv_m: torch.Tensor,
                   queue_t: torch.Tensor, queue_v: torch.Tensor, same_image: torch.Tensor,
                   temperature: torch.Tensor | float, distill: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """L_ica (Eq. 4–5) per sample. Candidates of each modality: the batch's teacher features, then
    that modality's queue (M, d). `same_image` (N, N, diagonal True): which batch images are
    sample i's (its ground truth for t2i, i2t and i2i; t2t's is the text itself)."""
    N = z_t.shape[0]
    cand_t = torch.cat([zt_m, queue_t.to(zt_m.dtype)], 0).float()
    cand_v = torch.cat([zv_m, queue_v.to(zv_m.dtype)], 0).float()
    pad = torch.zeros(N, cand_t.shape[0] - N, dtype=torch.bool, device=z_t.device)
    pos_img = torch.cat([same_image, pad], 1)
    pos_txt = torch.cat([torch.eye(N, dtype=torch.bool, device=z_t.device), pad], 1)
    parts = {}
    with torch.no_grad():
        tgt = {"t2t": ica_targets(zt_m.float() @ cand_t.t() / temperature, pos_txt, distill),
               "i2i": ica_targets(zv_m.float() @ cand_v.t() / temperature, pos_img, distill),
               "t2i": ica_targets(zt_m.float() @ cand_v.t() / temperature, pos_img, distill),
               "i2t": ica_targets(zv_m.float() @ cand_t.t() / temperature, pos_img, distill)}  # fmt: skip
    for name, q, cand in (("t2t", z_t, cand_t), ("i2i", z_v, cand_v), ("t2i", z_t, cand_v), ("i2t", z_v, cand_t)):
        parts[name] = soft_cross_entropy(q.float() @ cand.t() / temperature, tgt[name])
    return parts["t2t"] + parts["i2i"] + parts["t2i"] + parts["i2t"], parts


# ---------------------------------------------------------------- the joint space and its teachers


def tower_parameter_names(model: nn.Module) -> list[str]:
    """The student weights the uni-modal towers read: BERT's embeddings, the first `uni_layers`
    text layers, the region embedding and the visual layers (the teachers' EMA copies)."""
    k = int(model.cfg.uni_layers)
    prefixes = ("lm.bert.embeddings.", "region_embedding.", "visual_layers.",
                *(f"lm.bert.encoder.layer.{i}." for i in range(k)))  # fmt: skip
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def _buffer_name(name: str) -> str:
    return name.replace(".", "__")


class _TowerView(nn.Module):
    """The model's towers as a module's `forward`, so that `functional_call` runs them with the
    teacher's weights in place of the student's (built per call, never stored)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.tower_embeddings(batch)


class JointSpace(nn.Module):
    """Student projections into the d-dim joint space, the codebook, γ, and the EMA teachers."""

    def __init__(self, model: nn.Module, opts: dict[str, Any]):
        super().__init__()
        H, d = model.hidden_size, int(opts["dim"])
        self.alpha = float(opts["ema"])
        self.text_proj, self.image_proj = nn.Linear(H, d), nn.Linear(H, d)
        self.codebook = nn.Parameter(F.normalize(torch.randn(int(opts["codewords"]), d), dim=-1))
        self.log_temp = nn.Parameter(torch.tensor(float(opts["temperature"])).log(),
                                     requires_grad=bool(opts["learn_temperature"]))  # fmt: skip
        self.tower_names = tower_parameter_names(model)
        students = dict(model.named_parameters())
        self.teacher = nn.Module()
        for n in self.tower_names:
            self.teacher.register_buffer(_buffer_name(n), students[n].detach().clone())
        for n, p in self.projection_parameters():
            self.teacher.register_buffer(_buffer_name(n), p.detach().clone())

    def projection_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{m}.{k}", p) for m in ("text_proj", "image_proj") for k, p in getattr(self, m).named_parameters()]

    def temperature(self) -> torch.Tensor:
        return self.log_temp.exp().clamp(*TEMPERATURE_RANGE)

    def features(self, model: nn.Module, out: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Unit student (`z_t`, `z_v`) and teacher (`zt_m`, `zv_m`) features of the batch, once per batch."""
        if "codis" not in out:
            t, v, _ = _towers(model, out, batch)
            z_t = F.normalize(self.text_proj(t.to(self.text_proj.weight.dtype)).float(), dim=-1)
            z_v = F.normalize(self.image_proj(v.to(self.image_proj.weight.dtype)).float(), dim=-1)
            zt_m, zv_m = self.teacher_features(model, batch)
            out["codis"] = {"z_t": z_t, "z_v": z_v, "zt_m": zt_m, "zv_m": zv_m}
        return out["codis"]

    def teacher_features(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        buf = dict(self.teacher.named_buffers())
        weights = {f"model.{n}": buf[_buffer_name(n)] for n in self.tower_names}
        with torch.no_grad():
            t, v = functional_call(_TowerView(model), weights, (batch,), strict=False)
            zt = F.linear(t, buf["text_proj__weight"], buf["text_proj__bias"])
            zv = F.linear(v, buf["image_proj__weight"], buf["image_proj__bias"])
        return F.normalize(zt.float(), dim=-1), F.normalize(zv.float(), dim=-1)

    @torch.no_grad()
    def update_teachers(self, model: nn.Module) -> None:
        """Eq. 6: teacher ← α·teacher + (1 − α)·student, for every teacher tensor."""
        students = dict(model.named_parameters())
        students.update(self.projection_parameters())
        for name, t in self.teacher.named_buffers():
            t.mul_(self.alpha).add_(students[name.replace("__", ".")].detach().to(t.dtype) * (1.0 - self.alpha))


def _float32(like: torch.Tensor):
    """Autocast off (the losses cast their inputs to float32 themselves)."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def codis_options(model: nn.Module) -> dict[str, Any]:
    opts = dict(getattr(model.cfg, "objective_options", {}).get("codis") or {})
    missing = [k for k in ("dim", "codewords", "ema", "temperature", "learn_temperature") if k not in opts]
    if missing:
        raise KeyError(f"codis objectives: model.cfg.objective_options['codis'] lacks {missing} (PretrainConfig.codis)")
    return opts


def joint_owner(model: nn.Module) -> str:
    return next(n for n in model.cfg.objectives if n in JOINT_OWNERS)


def joint_space(model: nn.Module) -> JointSpace:
    return model.objectives[joint_owner(model)].joint


class _CodisObjective(Objective):
    """Shared: owns the `JointSpace` when it is the first CODIS objective of the model."""

    granularities = CODIS_GRANULARITIES
    needs = ("text_mask", "region_mask", "image_index")

    def __init__(self, model):
        super().__init__(model)
        self.opts = codis_options(model)
        self.joint = JointSpace(model, self.opts) if joint_owner(model) == self.name else None

    def after_update(self, model):
        if self.joint is not None:
            self.joint.update_teachers(model)


@register("codebook")
class CodebookLoss(_CodisObjective):
    """L_code (CODIS Eq. 1–3) on the joint space; logs `codebook_usage`."""

    def forward(self, model, out, batch):
        joint = joint_space(model)
        f = joint.features(model, out, batch)
        o = self.opts
        with _float32(f["z_t"]):  # IPOT's marginals and the 1e-5 losses need fp32, not bf16 autocast
            loss, parts = codebook_per_sample(f["z_t"], f["z_v"], f["zt_m"], f["zv_m"], joint.codebook,
                                              joint.temperature(), float(o["ipot_eps"]), int(o["ipot_iters"]),
                                              int(o["ipot_inner"]), float(o["ot_weight"]))  # fmt: skip
        usage = codebook_usage(parts["plan_t"], parts["plan_v"])
        valid = torch.ones_like(loss, dtype=torch.bool)
        return ObjectiveOutput(loss, valid, {"log": {"codebook_usage": usage}})


@register("ica")
class IntraCrossAlignment(_CodisObjective):
    """L_ica (CODIS Eq. 4–5) against memory queues of teacher features (`queue_size` per modality)."""

    def __init__(self, model):
        super().__init__(model)
        M, d = int(self.opts["queue_size"]), int(self.opts["dim"])
        # ALBEF's start: random unit vectors (easy negatives), so the candidates' count never changes
        self.register_buffer("queue_t", F.normalize(torch.randn(M, d), dim=-1))
        self.register_buffer("queue_v", F.normalize(torch.randn(M, d), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's teacher features, enqueued after it

    def forward(self, model, out, batch):
        joint = joint_space(model)
        f = joint.features(model, out, batch)
        img = batch["image_index"]
        same = img.unsqueeze(0) == img.unsqueeze(1)
        with _float32(f["z_t"]):
            loss, _ = ica_per_sample(f["z_t"], f["z_v"], f["zt_m"], f["zv_m"], self.queue_t, self.queue_v, same,
                                     joint.temperature(), float(self.opts["distill"]))  # fmt: skip
        if self.training and torch.is_grad_enabled():
            self.pending.append((f["zt_m"].detach(), f["zv_m"].detach()))
        return ObjectiveOutput(loss, torch.ones_like(loss, dtype=torch.bool))

    def after_update(self, model):
        super().after_update(model)
        if self.pending:
            zt = torch.cat([p[0] for p in self.pending])
            zv = torch.cat([p[1] for p in self.pending])
        else:
            zt = zv = self.queue_t.new_zeros(0, self.queue_t.shape[1])
        self.pending = []
        self.enqueue(gather_rows(zt), gather_rows(zv))

    @torch.no_grad()
    def enqueue(self, zt: torch.Tensor, zv: torch.Tensor) -> None:
        """Ring-buffer write of the newest rows (all ranks' rows, in rank order)."""
        M = self.queue_t.shape[0]
        zt, zv = zt[-M:], zv[-M:]
        n = zt.shape[0]
        if n == 0 or M == 0:
            return
        idx = (int(self.queue_ptr) + torch.arange(n, device=zt.device)) % M
        self.queue_t[idx] = zt.to(self.queue_t.dtype)
        self.queue_v[idx] = zv.to(self.queue_v.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % M)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `x`, in rank order (rows may differ in number); `x` outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(int(s) for s in sizes))
    if top == 0:
        return x
    padded = torch.cat([x, x.new_zeros(top - x.shape[0], x.shape[1])])
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


# ---------------------------------------------------------------- the `codis` granularity


class CodisDataset(GranularityDataset):
    """Retrieved pairs `(image, sentence)` (rank < k): MLM at `mlm_prob` (BERT's 80/10/10) and
    `image_index` (pairs of the same image are not each other's negatives). No concepts: the
    towers read the tokens and the regions, as `coarse=towers` zero-shot gives them."""

    name = "codis"
    needs = frozenset({"pairs"})

    def __len__(self) -> int:
        return len(self.corpus.pair_text)

    def samples(self, indices: np.ndarray, rng: np.random.Generator) -> list[Sample]:
        return pair_samples(self, indices, rng, self.mlm_mask, negatives=False)

    def collate(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        samples = self.samples(indices, rng)
        batch = assemble(samples, self.corpus, self.tok)
        batch.update(granularity=self.name, regions_first=False,
                     image_index=torch.tensor([s.image for s in samples], dtype=torch.long))  # fmt: skip
        return batch


GRANULARITIES.setdefault(CodisDataset.name, CodisDataset)
