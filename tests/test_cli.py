"""The CLI surface: help, typed configs with overrides, dry-run, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysys import config
from raysys.cli import build_parser, main
from raysys.data.world import WorldConfig
from raysys.experiments.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "raysys", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"world", "import", "validate", "demo", "bench"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.format_help(), name


def test_config_overrides_are_typed():
    cfg = config.from_dict(PipelineConfig, config.apply_overrides({"world": {"images": 10}}, ["world.seed=4", "seed=2"]))
    assert cfg.world.images == 10 and cfg.world.seed == 4 and cfg.seed == 2
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.from_dict(WorldConfig, {"imagez": 3})
    with pytest.raises(config.ConfigError, match="expected an integer"):
        config.from_dict(WorldConfig, {"images": "many"})
    assert config.flatten(config.to_dict(cfg))["world.images"] == 10
    # YAML 1.1 reads `2e-4` (no dot) as a string: a float field still takes it
    from raysys.pretrain.config import PretrainConfig

    assert config.from_dict(PretrainConfig, config.apply_overrides({}, ["lr=2e-4"])).lr == 2e-4
    with pytest.raises(config.ConfigError, match="expected a number"):
        config.from_dict(PretrainConfig, {"lr": "fast"})


def test_yaml_never_executes_code(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("world: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(PipelineConfig, p)


def test_demo_dry_run_prints_resolved_config(tmp_path):
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text(yaml.safe_dump({"world": {"images": 50}}))
    r = _cli("demo", "--config", cfgf, "--dry-run", "world.seed=9")
    assert r.returncode == 0, r.stderr
    d = yaml.safe_load(r.stdout)
    assert d["world"]["images"] == 50 and d["world"]["seed"] == 9


def test_world_cli_and_bad_override(tmp_path):
    r = _cli("world", "--images", 30, "--seed", 1, "--out", tmp_path / "w", "feature_dim=32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["images"] == 30 and out["gold"] == 150
    r = _cli("world", "--out", tmp_path / "x", "nosuchkey=1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nosuchkey" in r.stderr
    assert not (tmp_path / "x").exists()


def test_pretrain_k_above_retrieval_k_fails_at_config_time(capsys):
    """K is owned by retrieval: a pipeline that would pre-train on ranks retrieval never kept stops
    when its config is loaded, before anything runs (also under --dry-run), in one line."""
    assert main(["demo", "--dry-run", "pretrain.k=10", "retrieval.k=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["raysys: error: pretrain.k=10 exceeds retrieval.k=5: pre-training can only use pairs that retrieval kept"]
    assert main(["demo", "--dry-run", "pretrain.k=10", "retrieval.k=10"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["pretrain"]["k"] == 10
    with pytest.raises(config.ConfigError, match=r"^pretrain.k=6 exceeds retrieval.k=5: "):
        config.from_dict(PipelineConfig, {"pretrain": {"k": 6}})
