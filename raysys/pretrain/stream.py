"""The streamed training input (paper scale): windows of training examples, turned into training
steps by Ray Data, fed to each Ray Train worker through `ray.train.get_dataset_shard`.

Why windows. A worker that loads its share of the corpus (`granularities.load_corpus`, the
`input=memory` bench baseline) grows with the corpus; at CC3M's 3.3 M images × 36 regions ×
2048-d it cannot start. Here the unit of work is a *window*: ≤ `window_images` consecutive
eligible images of one `examples/` shard (`raysys assemble`: one row per image with its regions,
its K retrieved texts, their phrase links, random and gold texts). A window is read from its
Parquet row groups alone, built into a small `Corpus`, and the granularity datasets, masking and
collation of `raysys.pretrain.granularities` run on it unchanged. What a worker holds is a few
collated steps; what a Ray Data actor holds is one window. Neither depends on the corpus size.

What a window decides:
- **ITM negatives** (I-S) are other images of the same window, drawn with the window's seed: a
  window of W images gives each negative W − 1 candidates (the in-memory path drew from the
  rank's whole shard).
- **Order.** Epoch e visits the windows in a seeded permutation (`seed`, e); within a window each
  granularity's samples are a seeded permutation (`seed`, e, window, cycle). A shard-level plus
  in-window shuffle, as WebDataset-style streaming does; never a global shuffle of the corpus.
- **`paired_ratio`** shuffles the texts of the window's non-true gold pairs among themselves.
  `random_pairs` uses the text `raysys assemble` stored per image (drawn by assemble's seed).
- **`round_robin`**'s text-only rows are the texts table cut into as many ranges as there are
  windows; window w takes range w.

Ranks and epochs. The windows of epoch e's permutation go to rank r at positions r, r + world, …
Every rank runs exactly `per_epoch × grad_accum` micro-steps per epoch (the smallest rank's
count in epoch 0, or `steps_per_epoch`); a rank with more drops its surplus, a rank with fewer
runs its windows again (cycle 1, other masks). The mixer (`round_robin`, `proportional`,
`joint`) runs within a window, over the granularities that window has samples of.

Determinism and resume. A micro-step is a pure function of (seed, epoch, window, cycle, step in
window), and the items of a rank are a pure function of (plan, rank, world). So the same seed,
data and worker count give the same batches; a run resumed at step S asks for the items from
micro-step S × grad_accum on (the window holding it is re-read; the steps before it in that
window are never collated), and a worker restarted within one `fit()` skips the rows it already
trained on (`StreamFeed`).
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raysys import config as rconfig
from raysys.config import ConfigError
from raysys.contract import ContractError, read_manifest, shard_files
from raysys.corpus.assemble import TABLE, check_examples, ensure_examples, table_examples
from raysys.corpus.concepts import ensure_concepts, read_concepts
from raysys.pretrain.boxes import location_features
from raysys.pretrain.config import PretrainConfig, TrainConfig
from raysys.pretrain.curriculum import make_mixer
from raysys.pretrain.granularities import GRANULARITIES, Corpus, GranularityStream, Link, corpus_needs
from raysys.pretrain.recipes import Recipe, joined, resolve

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the plan (driver, once)


@dataclass(frozen=True)
class Window:
    """≤ `window_images` eligible images of one examples shard: the shard, its row numbers, the
    text-only range `[t0, t1)` of the texts table, and the micro-steps its mixer makes."""

    file: str
    rows: tuple[int, ...]
    t0: int
    t1: int
    steps: int


@dataclass(frozen=True)
class StreamPlan:
    data: str
    windows: tuple[Window, ...]
    per_epoch: int  # optimiser steps per epoch, every rank
    grad_accum: int
    world: int
    images: int  # eligible images in all windows

    @property
    def micro_per_epoch(self) -> int:
        return self.per_epoch * self.grad_accum


def plan(data: str | Path, cfg: PretrainConfig, recipe: Recipe, world: int = 1) -> StreamPlan:
    """Windows and steps of a run, from the examples' small columns (never the features): the
    driver reads O(images) integers and strings once, a worker reads only its windows."""
    root = Path(data)
    ensure_examples(root)
    check_examples(root)
    needs = corpus_needs(list(recipe.granularities), recipe.options)
    if "concepts" in needs:
        ensure_concepts(root, cfg.min_concept_count)
    rows_per_file = _eligible_rows(root, cfg)
    n = sum(len(r) for _, r in rows_per_file)
    if n == 0:
        raise ContractError(root / TABLE, None, "image_id", "no images left for pre-training")
    size = max(1, min(cfg.window_images, -(-n // world)))
    cuts = [(f, [int(r) for r in part]) for f, rows in rows_per_file  # near-equal windows: no 1-image tail
            for part in np.array_split(np.asarray(rows, np.int64), -(-len(rows) // size))]  # fmt: skip
    if len(cuts) < world:
        raise ConfigError(f"workers: {world} workers but only {len(cuts)} windows of examples; use fewer workers")
    n_texts = _count_texts(root) if "text_pool" in needs else 0
    windows = []
    for w, (f, rows) in enumerate(cuts):
        t0, t1 = n_texts * w // len(cuts), n_texts * (w + 1) // len(cuts)
        corpus = window_corpus(root, f, rows, cfg, needs, (t0, t1), features=False)
        windows.append(Window(str(f), tuple(rows), t0, t1, window_steps(corpus, recipe, cfg)))
    grad_accum = int(getattr(cfg, "grad_accum", 1))
    if cfg.steps_per_epoch:
        per_epoch = cfg.steps_per_epoch
    else:
        order = _epoch_order(cfg.seed, 0, len(windows))
        per_epoch = max(1, min(sum(windows[w].steps for w in order[r::world]) for r in range(world)) // grad_accum)
    return StreamPlan(str(root), tuple(windows), per_epoch, grad_accum, world, n)


def sample_corpus(p: StreamPlan, cfg: PretrainConfig, recipe: Recipe, features: bool) -> Corpus:
    """A corpus of the first windows (plan order) until `region_init_max_regions` regions (every
    window when 0): what `region_init=tags` fits on, bounded by that setting and not by the
    corpus. `features=False`: the first window without features (the model's dimensions only)."""
    root = Path(p.data)
    parts: list[Corpus] = []
    for w in p.windows:
        parts.append(window_corpus(root, w.file, w.rows, cfg, set(), (0, 0), features=features))
        if not features or (cfg.region_init_max_regions and sum(len(c.tags) for c in parts) >= cfg.region_init_max_regions):
            break
    first = parts[0]
    if len(parts) == 1:
        return first
    counts = np.concatenate([np.diff(c.offsets) for c in parts])
    return Corpus(feature_dim=first.feature_dim, num_classes=first.num_classes,
                  image_ids=[i for c in parts for i in c.image_ids],
                  offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                  features=np.concatenate([c.features for c in parts]), loc=np.concatenate([c.loc for c in parts]),
                  class_ids=np.concatenate([c.class_ids for c in parts]), tags=[t for c in parts for t in c.tags])  # fmt: skip


def _eligible_rows(root: Path, cfg: PretrainConfig) -> list[tuple[Path, list[int]]]:
    """Per examples shard, the row numbers pre-training may use, in table order: not in the gold
    "eval" split (when `exclude_eval`), the first `max_images` of them (when set)."""
    out, left = [], cfg.max_images or None
    for f in shard_files(root, TABLE):
        ev = pq.read_table(f, columns=["gold_eval"]).column(0).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(~ev if cfg.exclude_eval else np.ones(len(ev), bool)).tolist()
        if left is not None:
            rows, left = rows[:left], left - min(left, len(rows))
        if rows:
            out.append((f, rows))
    return out


def _count_texts(root: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(root, "texts"))


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed & 0xFFFFFFFF, 0xE90C, epoch]).permutation(n)


def window_steps(corpus: Corpus, recipe: Recipe, cfg: PretrainConfig) -> int:
    """Micro-steps the window's mixer makes: one pass over its largest (joint) or every
    (round_robin, proportional) granularity's batches."""
    sizes = {g: n for g in recipe.granularities if (n := granularity_size(corpus, g, cfg))}
    if not sizes:
        return 0
    return make_mixer(recipe.mixing, list(sizes), {g: -(-n // cfg.batch_size) for g, n in sizes.items()}, 0).steps_per_epoch


def granularity_size(corpus: Corpus, g: str, cfg: PretrainConfig) -> int:
    """Samples of granularity g in a corpus, without building its dataset (no tokenizer): the
    driver counts windows with this. A granularity added by a plugin is counted by building it."""
    if g in ("rt", "image"):
        return corpus.n_images
    if g in ("is", "mvptr"):  # one sample per retrieved pair
        return len(corpus.pair_text)
    if g == "rp":
        return sum(1 for links in corpus.links if links)
    if g == "text":
        return len(corpus.text_pool)
    if g == "pairs":
        return len(corpus.paired)
    from raysys.pretrain.model import load_tokenizer  # lazy: transformers, only for plugin granularities

    return len(GRANULARITIES[g](corpus, load_tokenizer(cfg.model_path), cfg))


# ---------------------------------------------------------------- one window as a Corpus


def read_rows(path: str | Path, rows: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
    """Rows of a Parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(path)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    lo, hi = min(rows), max(rows)
    groups = [i for i in range(pf.num_row_groups) if starts[i] <= hi and starts[i + 1] > lo]
    t = pf.read_row_groups(groups, columns=list(columns) if columns else None)
    return t.take(pa.array(np.asarray(rows, np.int64) - starts[groups[0]]))


def window_corpus(
    root: Path, file: str | Path, rows: Sequence[int], cfg: PretrainConfig, needs: set[str], texts: tuple[int, int],
    features: bool = True, salt: str = "",
) -> Corpus:  # fmt: skip
    """The `Corpus` of one window: what `load_corpus` holds for these images (regions truncated
    to `max_regions`, pairs with rank < k and their links), plus the window's text-only range and
    pairing. `features=False` (the driver's count) leaves the region arrays empty."""
    man = read_manifest(root)
    names = pq.ParquetFile(file).schema_arrow.names
    t = read_rows(file, rows, None if features else [c for c in names if c not in ("features", "class_probs")])
    if not features:
        t = t.append_column("features", _placeholder_features(t.column("boxes")))
    ex = list(table_examples(t, cfg.k, cfg.max_regions))
    counts = np.array([len(e.class_ids) for e in ex], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    dim = int(man.get("feature_dim") or 0)
    num_classes = cfg.num_classes or len(man.get("tag_vocab") or []) or 1 + max((int(e.class_ids.max(initial=0)) for e in ex), default=0)
    c = Corpus(
        feature_dim=dim, num_classes=num_classes, image_ids=[e.image_id for e in ex], offsets=offsets,
        features=np.concatenate([e.features for e in ex]) if features and ex else np.zeros((0, dim), np.float16),
        loc=np.concatenate([location_features(e.boxes, e.width, e.height) for e in ex]).astype(np.float32) if ex else np.zeros((0, 5), np.float32),
        class_ids=np.concatenate([e.class_ids for e in ex]) if ex else np.zeros(0, np.int64),
        tags=[tag for e in ex for tag in e.tags],
        class_probs=np.concatenate([e.class_probs for e in ex]) if features and ex and ex[0].class_probs is not None else None,
    )  # fmt: skip
    if "pairs" in needs:
        _window_pairs(c, ex, with_links="phrases" in needs)
    if "random_pairs" in needs:
        c.paired = [(n, e.random_text_id) for n, e in enumerate(ex) if e.random_text_id is not None]
        c.paired_true = np.zeros(len(c.paired), bool)
        c.texts.update({e.random_text_id: e.random_text for e in ex if e.random_text_id is not None})
    if "gold_pairs" in needs:
        _window_gold(c, ex, cfg, f"{file}:{rows[0]}")
    if "text_pool" in needs and texts[1] > texts[0]:
        ids, txt = _text_range(root, *texts)
        c.text_pool = ids
        c.texts.update(zip(ids, txt))
    c.concepts = _concepts(str(root))
    return c


@functools.lru_cache(maxsize=4)
def _concepts(root: str) -> list[str] | None:
    """The dataset's concept vocabulary, read once per process (every window shares it)."""
    return read_concepts(root)


def _placeholder_features(boxes: pa.ChunkedArray) -> pa.Array:
    """One zero float16 per region, for a count that must not read the features."""
    b = boxes.combine_chunks()
    off = np.asarray(b.offsets)
    off = (off - off[0]).astype(np.int32)
    values = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(int(off[-1]), np.float16)), 1)
    return pa.ListArray.from_arrays(pa.array(off), values)


def _window_pairs(c: Corpus, ex: list, with_links: bool) -> None:
    for e in ex:
        for j, tid in enumerate(e.text_ids):
            c.pair_text.append(tid)
            c.texts[tid] = e.texts[j]
            c.links.append([Link(*lk) for lk in e.links[j]] if with_links else [])
    c.pair_image = np.array([n for n, e in enumerate(ex) for _ in e.text_ids], np.int64)
    c.pair_rank = np.concatenate([e.ranks for e in ex]).astype(np.int64) if ex else np.zeros(0, np.int64)
    c.pair_score = np.concatenate([e.scores for e in ex]).astype(np.float32) if ex else np.zeros(0, np.float32)


def _window_gold(c: Corpus, ex: list, cfg: PretrainConfig, key: str) -> None:
    """`paired_ratio` within the window: its train-split gold pairs, a seeded fraction kept true,
    the rest's texts shuffled among themselves (the same for every epoch)."""
    g = sorted((n, tid, txt) for n, e in enumerate(ex)
               for tid, txt, s in zip(e.gold_text_ids, e.gold_texts, e.gold_splits) if s != "eval")  # fmt: skip
    rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, zlib.crc32(b"paired_ratio"), zlib.crc32(key.encode())])
    n_true = int(round(cfg.paired_ratio * len(g)))
    perm = rng.permutation(len(g))
    rest = perm[n_true:]
    shuffled = [t for _, t, _ in g]
    for a, b in zip(rest, rest[rng.permutation(len(rest))]):
        shuffled[a] = g[b][1]
    c.paired = [(n, shuffled[k]) for k, (n, _, _) in enumerate(g)]
    c.paired_true = np.array([shuffled[k] == g[k][1] for k in range(len(g))], bool)
    c.texts.update({tid: txt for _, tid, txt in g})


def _text_range(root: Path, t0: int, t1: int) -> tuple[list[str], list[str]]:
    """Rows [t0, t1) of the texts table (its shards in order), reading only their row groups."""
    ids: list[str] = []
    txt: list[str] = []
    base = 0
    for f in shard_files(root, "texts"):
        n = pq.ParquetFile(f).metadata.num_rows
        lo, hi = max(t0, base), min(t1, base + n)
        if lo < hi:
            t = read_rows(f, range(lo - base, hi - base), ["text_id", "text"])
            ids += t.column("text_id").to_pylist()
            txt += t.column("text").to_pylist()
        base += n
    return ids, txt


# ---------------------------------------------------------------- a rank's items


@dataclass(frozen=True)
class Item:
    """Micro-steps `[first, first + count)` of window `window` in epoch `epoch`, cycle `cycle`;
    `micro` is the rank's global micro-step index of the first."""

    epoch: int
    window: int
    cycle: int
    first: int
    count: int
    micro: int


def rank_items(p: StreamPlan, seed: int, rank: int, total_micro: int, start_micro: int = 0) -> list[Item]:
    """The items rank `rank` trains on, from micro-step `start_micro` to `total_micro`."""
    items: list[Item] = []
    micro, epoch = 0, 0
    need = p.micro_per_epoch
    while micro < total_micro:
        mine = [int(w) for w in _epoch_order(seed, epoch, len(p.windows))[rank :: p.world]]
        if not any(p.windows[w].steps for w in mine):
            raise ContractError(p.data, None, TABLE, f"rank {rank} has no training steps in epoch {epoch}")
        got, cycle = 0, 0
        while got < need and micro < total_micro:
            for w in mine:
                take = min(p.windows[w].steps, need - got, total_micro - micro)
                if take <= 0:
                    continue
                if micro + take > start_micro:
                    skip = max(0, start_micro - micro)
                    items.append(Item(epoch, w, cycle, skip, take - skip, micro + skip))
                got, micro = got + take, micro + take
            cycle += 1
        epoch += 1
    return items


# ---------------------------------------------------------------- collation (a Ray Data actor, or in-process)


class Collate:
    """Items → training steps: reads a window, tokenises, masks, draws ITM negatives and
    collates, exactly as the in-memory streams do, on the window's `Corpus`. One row per
    micro-step: `micro`, `epoch` and `payload` (the step's batches, numpy, pickled: Ray moves
    the bytes through the object store as one column)."""

    def __init__(self, plan_json: str, cfg_dict: dict[str, Any]):
        from raysys.pretrain.model import load_tokenizer  # lazy: transformers in the actor, not the driver

        self.plan = plan_from_json(plan_json)
        self.cfg = rconfig.from_dict(TrainConfig, cfg_dict)
        self.recipe = resolve(self.cfg)  # resolving also registers a recipe's own granularities (e.g. mvptr)
        self.tok = load_tokenizer(self.cfg.model_path)
        self.needs = corpus_needs(list(self.recipe.granularities), self.recipe.options)

    def steps(self, item: Item) -> Iterator[tuple[int, int, int, list[dict[str, Any]]]]:
        """(micro, epoch, rows read, batches) of each micro-step of an item; batches hold numpy
        arrays; the first step carries the number of examples rows its window read."""
        w = self.plan.windows[item.window]
        corpus = window_corpus(Path(self.plan.data), w.file, w.rows, self.cfg, self.needs, (w.t0, w.t1))
        key = f"{self.cfg.seed}/{item.epoch}/{item.window}/{item.cycle}"
        streams = {g: GranularityStream(GRANULARITIES[g](corpus, self.tok, self.cfg), self.cfg.batch_size, key)
                   for g in joined(self.recipe, item.epoch) if granularity_size(corpus, g, self.cfg)}  # fmt: skip
        mixer = make_mixer(self.recipe.mixing, list(streams), {g: len(s) for g, s in streams.items()}, zlib.crc32(key.encode()))
        for j in range(item.first, item.first + item.count):
            batches = [_to_numpy(streams[g].batch(b)) for g, b in mixer.at(j)]
            yield item.micro + j - item.first, item.epoch, len(w.rows) if j == item.first else 0, batches

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for row in range(len(batch["micro"])):
            item = Item(**{f: int(batch[f][row]) for f in Item.__dataclass_fields__})
            for micro, epoch, rows, batches in self.steps(item):
                yield {"micro": np.array([micro], np.int64), "epoch": np.array([epoch], np.int64),
                       "rows": np.array([rows], np.int64),
                       "payload": np.array([pickle.dumps(batches, protocol=5)], dtype=object)}  # fmt: skip


def _to_numpy(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}


def plan_json(p: StreamPlan) -> str:
    return json.dumps(asdict(p))


def plan_from_json(text: str) -> StreamPlan:
    p = json.loads(text)
    p["windows"] = tuple(Window(**{**w, "rows": tuple(w["rows"])}) for w in p["windows"])
    return StreamPlan(**p)


def total_micro(p: StreamPlan, cfg: PretrainConfig, steps: int | None = None) -> int:
    """Micro-steps of the run: optimiser steps (`steps`, else `cfg.steps`, else epochs ×
    per_epoch) × grad_accum. `raysys.pretrain.loop.stream_run_plan` is its `Plan`."""
    return (steps if steps is not None else (cfg.steps or cfg.epochs * p.per_epoch)) * p.grad_accum


# ---------------------------------------------------------------- the Ray Data pipeline of one rank


def dataset(p: StreamPlan, cfg: PretrainConfig, items: list[Item]):
    """Rank's items → its steps, as a Ray Data dataset: one input block per item, a pool of
    `data_actors` actors of `data_cpus` CPUs each running `Collate`, order preserved (the rank
    trains on its steps in order)."""
    import ray.data  # lazy: only the Ray Train driver builds pipelines

    rows = [asdict(i) for i in items]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    return ds.map_batches(
        Collate, batch_size=1, batch_format="numpy", zero_copy_batch=True,
        fn_constructor_args=(plan_json(p), rconfig.to_dict(cfg)),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.data_actors)), num_cpus=cfg.data_cpus,
    )  # fmt: skip


def dataset_name(rank: int) -> str:
    return f"train_rank{rank}"


# ---------------------------------------------------------------- the consumer side


class StreamFeed:
    """A worker's (or the local loop's) steps in order: `batches(micro)` returns micro-step
    `micro`'s batches as tensors. Rows before the first asked-for micro-step are skipped (a
    worker restarted within one fit() resumes later than its dataset starts); `wait_s` is the
    time spent waiting for data after the first step (`first_wait_s`: the pipeline's start-up,
    actors included)."""

    def __init__(self, rows: Iterator[tuple[int, int, int, list[dict[str, Any]]]]):
        self.rows = rows
        self.wait_s = 0.0
        self.first_wait_s: float | None = None
        self.rows_read = 0  # examples rows the windows of this feed read (no worker reads the table)

    def batches(self, micro: int) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        for m, _, n_rows, batches in self.rows:
            self.rows_read += n_rows
            if m == micro:
                if self.first_wait_s is None:
                    self.first_wait_s = time.perf_counter() - t0
                else:
                    self.wait_s += time.perf_counter() - t0
                return [_to_torch(b) for b in batches]
            if m > micro:
                break
        raise RuntimeError(f"the training stream has no micro-step {micro} (its rows ended or skipped it)")


def ray_rows(iterator, prefetch: int) -> Iterator[tuple[int, int, int, list[dict[str, Any]]]]:
    """Rows of a `ray.train.get_dataset_shard` iterator as (micro, epoch, rows read, batches)."""
    for b in iterator.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=prefetch):
        yield int(b["micro"][0]), int(b["epoch"][0]), int(b["rows"][0]), pickle.loads(b["payload"][0])


def local_rows(p: StreamPlan, cfg: PretrainConfig, items: list[Item]):
    """The same steps in this process (`raysys pretrain --local`): `Collate` without Ray."""
    col = Collate(plan_json(p), rconfig.to_dict(cfg))
    for item in items:
        yield from col.steps(item)
