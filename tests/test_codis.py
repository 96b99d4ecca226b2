"""CODIS (papers/004) on the retrieved pairs: IPOT against an LP optimum, L_code and L_ica by hand,
the EMA teachers and queues, and the `codis` recipe end to end (local, towers zero-shot, and —
marked slow — 2 DDP ranks and a resumed Ray Train run)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _pretrain_fixtures import make_tiny_dataset, tiny_bert_folder
from scipy.optimize import linprog

from raysys.cli import main
from raysys.evaluate.zeroshot import REQUIRED_KEYS, ZeroShotConfig, evaluate_zeroshot
from raysys.pretrain.codis import (
    CodisDataset,
    codebook_per_sample,
    codebook_usage,
    ica_per_sample,
    ipot,
    joint_space,
    tower_parameter_names,
)
from raysys.pretrain.config import CodisConfig, PretrainConfig
from raysys.pretrain.granularities import load_corpus
from raysys.pretrain.model import ModelConfig, build_model, load_checkpoint, load_tokenizer

# ---------------------------------------------------------------- IPOT


def _lp_optimum(cost: np.ndarray, mu: np.ndarray, nu: np.ndarray) -> float:
    """The exact OT cost min ⟨T, C⟩ over T ≥ 0 with row sums μ and column sums ν (an LP)."""
    n, k = cost.shape
    rows = np.kron(np.eye(n), np.ones(k))
    cols = np.kron(np.ones(n), np.eye(k))
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([mu, nu]), bounds=(0, None))
    assert res.success
    return float(res.fun)


def test_ipot_on_3x4_matches_the_marginals_and_the_lp_optimum():
    cost = np.array([[0.2, 0.9, 0.4, 0.7], [0.6, 0.1, 0.8, 0.3], [0.5, 0.4, 0.05, 0.9]])
    mu, nu = np.array([0.5, 0.3, 0.2]), np.full(4, 0.25)
    T = ipot(torch.tensor(cost), torch.tensor(mu), torch.tensor(nu), eps=0.1, iters=300).numpy()
    np.testing.assert_allclose(T.sum(1), mu, atol=1e-4)
    np.testing.assert_allclose(T.sum(0), nu, atol=1e-4)
    assert (T >= 0).all()
    assert abs((T * cost).sum() - _lp_optimum(cost, mu, nu)) < 1e-3
    # the config's ε = 0.5 on the paper's uniform marginals (more iterations than its 50 for 1e-4)
    u = np.full(3, 1 / 3)
    T = ipot(torch.tensor(cost), torch.tensor(u), torch.tensor(nu), eps=CodisConfig.ipot_eps, iters=200).numpy()
    np.testing.assert_allclose(T.sum(1), u, atol=1e-4)
    np.testing.assert_allclose(T.sum(0), nu, atol=1e-4)
    assert abs((T * cost).sum() - _lp_optimum(cost, u, nu)) < 1e-3


def test_ipot_finds_a_permutation_optimum_batched():
    rng = np.random.default_rng(0)
    perms = [np.array([2, 0, 3, 1]), np.array([1, 3, 0, 2])]
    costs = []
    for p in perms:
        c = rng.uniform(0.5, 1.0, (4, 4))
        c[np.arange(4), p] = rng.uniform(0.0, 0.2, 4)  # the permutation is the unique optimum
        costs.append(c)
    C = torch.tensor(np.stack(costs))
    u = torch.full((2, 4), 0.25, dtype=torch.float64)
    T = ipot(C, u, u, eps=0.5, iters=200).numpy()
    for b, (c, p) in enumerate(zip(costs, perms)):
        optimum = c[np.arange(4), p].sum() / 4
        assert abs((T[b] * c).sum() - optimum) < 1e-3
        assert (T[b].argmax(1) == p).all()
        single = ipot(torch.tensor(c), u[0], u[0], eps=0.5, iters=200).numpy()
        np.testing.assert_allclose(T[b], single, atol=1e-12)  # batched = one at a time


# ---------------------------------------------------------------- the losses by hand


def _unit(rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def _ipot_numpy(D: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Algorithm 2 written out with uniform marginals (δ = 1/(n Qσ), σ = 1/(k Qᵀδ))."""
    n, k = D.shape
    A = np.exp(-D / eps)
    T = np.ones((n, k))
    sigma = np.full(k, 1.0 / k)
    for _ in range(iters):
        Q = A * T
        delta = 1.0 / (n * (Q @ sigma))
        sigma = 1.0 / (k * (Q.T @ delta))
        T = delta[:, None] * Q * sigma[None, :]
    return T


def test_codebook_loss_equals_a_hand_computation():
    z_t, z_v = _unit([[1.0, 0.2], [0.1, 1.0]]), _unit([[0.9, -0.3], [0.4, 0.8]])
    zt_m, zv_m = _unit([[1.0, 0.0], [0.3, 1.0]]), _unit([[1.0, -0.1], [0.2, 1.0]])
    C = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)  # normalised inside
    tau, eps, iters, w = 0.5, 0.5, 30, 0.7
    loss, parts = codebook_per_sample(z_t, z_v, zt_m, zv_m, C, tau, eps, iters, 1, w)
    c = (C / C.norm(dim=1, keepdim=True)).numpy()
    expect = []
    plans = {}
    for m, z in (("t", zt_m.numpy()), ("v", zv_m.numpy())):
        D = 1.0 - z @ c.T
        plans[m] = (_ipot_numpy(D, eps, iters), D)
    for i in range(2):
        def ce(student, plan, i=i):
            s = student[i] @ c.T / tau
            logp = s - math.log(sum(math.exp(x) for x in s))
            y = plan[i] / plan[i].sum()
            return -float((y * logp).sum())

        tp = ce(z_t.numpy(), plans["v"][0])  # text students vs the image plan (Eq. 2)
        ip = ce(z_v.numpy(), plans["t"][0])
        ot = sum(2 * float((plans[m][0][i] * plans[m][1][i]).sum()) for m in ("t", "v"))  # N·Σ_j T_ij D_ij
        expect.append(tp + ip + w * ot)
        assert float(parts["tp"][i]) == pytest.approx(tp, abs=1e-5)
        assert float(parts["ip"][i]) == pytest.approx(ip, abs=1e-5)
    np.testing.assert_allclose(loss.numpy(), expect, atol=1e-5)
    np.testing.assert_allclose(parts["plan_t"].numpy(), plans["t"][0], atol=1e-7)
    # the batch mean of the per-sample OT terms is ⟨T, D⟩ (Eq. 1)
    assert float(parts["ot_t"].mean()) == pytest.approx(float((plans["t"][0] * plans["t"][1]).sum()), abs=1e-6)
    # gradients reach the students and the codebook, never the teachers
    C.requires_grad_(True)
    zs = z_t.clone().requires_grad_(True)
    codebook_per_sample(zs, z_v, zt_m, zv_m, C, tau, eps, iters).__getitem__(0).sum().backward()
    assert zs.grad is not None and C.grad is not None and float(C.grad.abs().sum()) > 0


def test_codebook_usage_counts_codewords_with_at_least_1_percent_of_the_rounded_plan():
    plan_t = torch.tensor([[0.5, 0.2, 0.0, 0.0], [0.0, 0.1, 0.6, 0.0]])
    plan_v = torch.tensor([[0.6, 0.1, 0.0, 0.0], [0.4, 0.3, 0.0, 0.0]])
    # rows go to codewords 0, 2, 0, 0: codewords 0 and 2 are used, 1 and 3 are not
    assert float(codebook_usage(plan_t, plan_v)) == 0.5
    assert float(codebook_usage(plan_t, plan_v, threshold=0.3)) == 0.25  # codeword 2 has 1/4 < 0.3


def test_ica_loss_equals_a_hand_computation():
    z_t, z_v = _unit([[1.0, 0.3], [-0.2, 1.0]]), _unit([[0.8, 0.5], [0.1, 1.0]])
    zt_m, zv_m = _unit([[1.0, 0.2], [0.0, 1.0]]), _unit([[1.0, 0.4], [0.3, 1.0]])
    q_t, q_v = _unit([[-1.0, 0.5]]), _unit([[0.5, -1.0]])
    same = torch.tensor([[True, True], [True, True]])  # both texts describe the same image
    same[0, 1] = same[1, 0] = False
    tau, a = 0.2, 0.4
    loss, parts = ica_per_sample(z_t, z_v, zt_m, zv_m, q_t, q_v, same, tau, a)
    cand_t = np.concatenate([zt_m.numpy(), q_t.numpy()])
    cand_v = np.concatenate([zv_m.numpy(), q_v.numpy()])

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    for i in range(2):
        onehot = np.array([i == 0, i == 1, False], float)  # same-image = itself here; queue never positive
        total = 0.0
        for name, s, t, cand in (("t2t", z_t, zt_m, cand_t), ("i2i", z_v, zv_m, cand_v),
                                 ("t2i", z_t, zt_m, cand_v), ("i2t", z_v, zv_m, cand_t)):  # fmt: skip
            y = a * softmax(t.numpy()[i] @ cand.T / tau) + (1 - a) * onehot
            h = -float((y * np.log(softmax(s.numpy()[i] @ cand.T / tau))).sum())
            assert float(parts[name][i]) == pytest.approx(h, abs=1e-5), name
            total += h
        assert float(loss[i]) == pytest.approx(total, abs=1e-5)
    # two texts of one image: each one's t2i ground truth is both batch images, half each
    both = torch.ones(2, 2, dtype=torch.bool)
    _, p2 = ica_per_sample(z_t, z_v, zt_m, zv_m, q_t, q_v, both, tau, 0.0)
    s = z_t.numpy()[0] @ cand_v.T / tau
    logp = s - np.log(np.exp(s).sum())
    assert float(p2["t2i"][0]) == pytest.approx(-0.5 * (logp[0] + logp[1]), abs=1e-6)


# ---------------------------------------------------------------- a real tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("codis")
    return make_tiny_dataset(root / "data", n_images=40, dim=16, k=3), tiny_bert_folder(root / "bert")


SMALL = {"codewords": 16, "queue_size": 12}


def _model(bert, **codis):
    opts = asdict(replace(CodisConfig(), **{**SMALL, **codis}))
    mc = ModelConfig(model_path=str(bert), feature_dim=16, num_classes=6, dropout=0.0, encoder="two_stage", uni_layers=1,
                     objectives=("mlm", "codebook", "ica", "itm_hard"), objective_options={"codis": opts})  # fmt: skip
    return build_model(mc, seed=0)


def _batch(data, bert, n=8, seed=0):
    cfg = PretrainConfig(model_path=str(bert))
    corpus = load_corpus(data, cfg, {"pairs"})
    ds = CodisDataset(corpus, load_tokenizer(str(bert)), cfg)
    return ds.collate(np.arange(n), np.random.default_rng(seed))


def test_ema_teacher_after_one_optimiser_step_and_the_queue(tiny):
    data, bert = tiny
    model = _model(bert)
    joint = joint_space(model)
    ica = model.objectives["ica"]
    names = tower_parameter_names(model)
    assert any(n.startswith("visual_layers.") for n in names) and "lm.bert.encoder.layer.1.attention.self.query.weight" not in names
    students = dict(model.named_parameters())
    teacher = dict(joint.teacher.named_buffers())
    assert not any(p.requires_grad for p in joint.teacher.buffers())
    assert all(torch.equal(teacher[n.replace(".", "__")], students[n]) for n in names)  # starts as a copy
    before = {k: v.clone() for k, v in teacher.items()}
    batch = _batch(data, bert)
    out = model(batch)
    assert set(out["losses"]) == {"mlm", "codebook", "ica", "itm_hard"}
    loss = sum(o.loss[o.valid].mean() for o in out["losses"].values()) + out["aux_zero"]
    loss.backward()
    assert joint.codebook.grad is not None and joint.text_proj.weight.grad is not None
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    queue_before = ica.queue_t.clone()
    for o in model.objectives.values():
        o.after_update(model)
    a = CodisConfig.ema
    students = dict(model.named_parameters())
    students.update({f"{m}.{k}": p for m in ("text_proj", "image_proj") for k, p in getattr(joint, m).named_parameters()})
    changed = 0
    for k, t in joint.teacher.named_buffers():
        s = students[k.replace("__", ".")].detach()
        torch.testing.assert_close(t, a * before[k] + (1 - a) * s, rtol=0, atol=0)
        changed += int(not torch.equal(t, before[k]))
    assert changed > 0
    # the batch's 8 teacher features went into the 12-row queue at 0..7; the pointer moved on
    assert int(ica.queue_ptr) == 8 and not ica.pending
    torch.testing.assert_close(ica.queue_t[:8], out["codis"]["zt_m"], rtol=0, atol=0)
    torch.testing.assert_close(ica.queue_t[8:], queue_before[8:], rtol=0, atol=0)
    ica.enqueue(out["codis"]["zt_m"], out["codis"]["zv_m"])  # wraps around: rows 8..11, then 0..3
    assert int(ica.queue_ptr) == 4
    torch.testing.assert_close(ica.queue_t[:4], out["codis"]["zt_m"][4:], rtol=0, atol=0)
    # nothing is enqueued from a forward outside training
    model.eval()
    with torch.no_grad():
        model(batch)
    assert not ica.pending


def _pretrain(capsys, out, data, bert, *extra: str) -> dict:
    capsys.readouterr()
    args = ["pretrain", "--local", "--data", str(data), "--recipe", "codis", "--steps", "3", "--out", str(out),
            f"model_path={bert}", "batch_size=8", "log_every=0", "dropout=0.0", "codis.codewords=64",
            "codis.queue_size=32", "tracking_uri=none", *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_codis_recipe_prints_every_term_and_towers_zero_shot_reads_it(tiny, tmp_path, capsys):
    data, bert = tiny
    res = _pretrain(capsys, tmp_path / "codis", data, bert)
    for term in ("codebook", "ica", "itm_hard", "mlm"):
        v = res[f"codis.{term}"]
        assert math.isfinite(v) and v > 0, (term, v)
    assert 0.0 < res["codis.codebook_usage"] <= 1.0
    model, _ = load_checkpoint(res["checkpoint"])
    assert model.cfg.encoder == "two_stage" and {"codebook", "ica", "itm_hard"} <= set(model.cfg.objectives)
    joint = joint_space(model)
    assert joint.codebook.shape == (64, 256) and model.objectives["ica"].queue_t.shape == (32, 256)
    assert model.cfg.objective_options["codis"]["codewords"] == 64
    assert int(model.objectives["ica"].queue_ptr) == 24  # 3 steps × 8 teacher features, in the checkpoint
    # after 3 steps the teachers have moved towards the students, but are not them
    w = "lm__bert__embeddings__LayerNorm__weight"
    t, s = joint.teacher.get_buffer(w), model.lm.bert.embeddings.LayerNorm.weight
    assert not torch.equal(t, s)
    towers = evaluate_zeroshot(res["checkpoint"], data, ZeroShotConfig(coarse="towers", mlflow=False))
    assert set(REQUIRED_KEYS) <= set(towers) and towers["encoder"] == "two_stage"
    assert 0.0 <= towers["t2i_r5"] <= 1.0 or 0.0 <= towers["t2i_r5"] <= 100.0


# ---------------------------------------------------------------- DDP ranks and resume (slow)


def _train_config(bert, **kw):
    from raysys.pretrain.config import TrainConfig

    return TrainConfig(recipe="codis", model_path=str(bert), batch_size=4, dropout=0.0, input="memory", log_every=0,
                       workers=2, experiment="test-codis", codis=CodisConfig(**SMALL), **kw)  # fmt: skip


def _ddp_rank(rank: int, world: int, data: str, bert: str, out: str, port: int) -> None:
    """One DDP rank as a Ray Train worker builds it (`ray_train._worker_trainee`, input=memory):
    its shard of the corpus, the batch counts all ranks agree on, the same DDP wrapper; 4 steps."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from raysys.pretrain.loop import make_trainee, prepare
    from raysys.pretrain.ray_train import _all_reduce, _every_parameter_in_the_graph, _no_buffer_sync

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = _train_config(bert, steps=4)
    np.random.seed(cfg.seed)
    setup = prepare(cfg, data, rank, world)
    names = list(setup.recipe.granularities)
    agreed = dict(zip(names, (int(x) for x in _all_reduce([float(len(setup.streams[g])) for g in names], torch.device("cpu"), "min"))))
    tr = make_trainee(cfg, setup, torch.device("cpu"), agreed, lambda m: DDP(_every_parameter_in_the_graph(m), **_no_buffer_sync()))
    assert tr.is_ddp
    for s in range(4):
        tr.step(s)
    state = {k: v for k, v in tr.module.state_dict().items() if k.startswith("objectives.")}
    torch.save(state, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _objective_state(path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(path)
    return {k: v for k, v in model.state_dict().items() if k.startswith("objectives.")}


@pytest.mark.slow
def test_teachers_and_queues_are_equal_across_two_ddp_ranks(tiny, tmp_path):
    import socket

    import torch.multiprocessing as mp

    data, bert = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, str(data), str(bert), str(tmp_path), port), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    teachers = [k for k in r0 if ".teacher." in k]
    assert teachers and r0.keys() == r1.keys()
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=k)
    # both ranks' features went in: 4 steps × 2 ranks × 4 samples = 32 rows through the 12-row queue
    assert int(r0["objectives.ica.queue_ptr"]) == 32 % 12


@pytest.mark.slow
def test_a_resumed_ray_train_run_has_the_uninterrupted_runs_teachers(ray_session, tiny, tmp_path):
    from raysys.pretrain.ray_train import fit

    data, bert = tiny
    cfg = _train_config(bert, epochs=2, steps_per_epoch=3)
    full = fit(cfg, data, "full", tmp_path)
    first = fit(replace(cfg, stop_after_epochs=1), data, "split", tmp_path)
    assert not first["complete"] and first["steps"] == 3
    second = fit(cfg, data, "split", tmp_path)
    assert second["complete"] and second["resumed_from_step"] == 3 and second["steps"] == full["steps"] == 6
    a, b = _objective_state(f"{full['checkpoint']}/model.pt"), _objective_state(f"{second['checkpoint']}/model.pt")
    assert any(".teacher." in k for k in a) and "objectives.ica.queue_t" in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
