"""Everything under cluster/ is read the way the cluster will read it, and every
entrypoint, import path, config key and file name it names must exist in the
code, so the manifests cannot rot silently when the code changes."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from ray_app.batch.config import NightlyConfig
from ray_app.config import load_config
from ray_app.data.config import PrepareConfig
from ray_app.evaluation.config import EvaluateConfig
from ray_app.pipeline.config import PipelineConfig
from ray_app.pipeline.run import stage_configs
from ray_app.serving.config import AppArgs
from ray_app.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIGS = sorted((CLUSTER / "configs").glob("*.yaml"))
MODELS = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "nightly": NightlyConfig,
    "pipeline": PipelineConfig,
}
IMAGE_TAG = re.compile(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu$", re.M)


def _manifests() -> dict[str, list[dict]]:
    return {
        str(p.relative_to(ROOT)): [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in sorted(CLUSTER.rglob("*.yaml"))
    }


def _rayjobs() -> list[tuple[str, dict]]:
    """Every RayJob, including the one a CronJob creates from its ConfigMap."""
    out = []
    for name, docs in _manifests().items():
        for d in docs:
            if d.get("kind") == "RayJob":
                out.append((name, d))
            if d.get("kind") == "ConfigMap":
                for key, text in d["data"].items():
                    for inner in yaml.safe_load_all(text):
                        if inner and inner.get("kind") == "RayJob":
                            out.append((f"{name}:{key}", inner))
    assert out
    return out


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for name, docs in _manifests().items():
        for d in docs:
            if d.get("kind") == "RayCluster":
                specs.append((name, d["spec"]))
            if d.get("kind") == "RayService":
                specs.append((name, d["spec"]["rayClusterConfig"]))
    specs += [(name, job["spec"]["rayClusterSpec"]) for name, job in _rayjobs()]
    return specs


def _pods(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group, container resources limits, group spec) of the head and each worker group."""
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    return [(n, g["template"]["spec"]["containers"][0], g) for n, g in groups]


def _qty(v: str | int) -> float:
    return float(str(v).rstrip("m")) / (1000 if str(v).endswith("m") else 1)


def _entrypoint_config(entrypoint: str):
    """`python jobs/<stage>.py --config <file> [--set k=v]... [--date D]` -> the stage
    name and the config it would run with (relative to the image's /app = repo root)."""
    argv = shlex.split(entrypoint.replace("__DATE__", "2026-11-24"))
    assert argv[0] == "python" and argv[1].startswith("jobs/"), entrypoint
    job = ROOT / argv[1]
    assert job.is_file(), f"{argv[1]} does not exist"
    stage = re.search(r'main\(\["(\w+)"', job.read_text()).group(1)
    from ray_app.cli import build_parser

    args = build_parser().parse_args([stage, *argv[2:]])
    assert args.config and (ROOT / args.config).is_file(), f"{args.config} does not exist"
    overrides = list(args.overrides) + (
        [f"date={args.date}"] if getattr(args, "date", None) else []
    )
    cfg = load_config(MODELS[stage], ROOT / args.config, overrides)
    return stage, cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path, monkeypatch):
    stage = path.name.split("-", 1)[0]
    assert stage in MODELS, f"{path.name}: name must start with a stage ({sorted(MODELS)})"
    monkeypatch.chdir(ROOT)
    cfg = load_config(MODELS[stage], path)
    if stage == "pipeline":
        stage_configs(cfg)


def test_every_yaml_under_cluster_parses_and_names_a_known_kind():
    kinds = {d.get("kind") for docs in _manifests().values() for d in docs}
    assert {"RayCluster", "RayJob", "RayService", "CronJob"} <= kinds


def test_rayjob_entrypoints_run_existing_jobs_with_valid_configs(monkeypatch):
    monkeypatch.chdir(ROOT)  # the image's working directory holds the repository
    seen = set()
    for name, job in _rayjobs():
        stage, cfg = _entrypoint_config(job["spec"]["entrypoint"])
        stages = stage_configs(cfg) if stage == "pipeline" else {stage: cfg}
        seen |= set(stages)
        if "nightly" in stages:
            assert stages["nightly"].date == "2026-11-24", f"{name}: the date must reach nightly"
        assert job["spec"]["shutdownAfterJobFinishes"] is True, name
    assert {"train", "nightly"} <= seen


def test_training_cluster_fits_the_training_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    for name, job in _rayjobs():
        stage, cfg = _entrypoint_config(job["spec"]["entrypoint"])
        stages = stage_configs(cfg) if stage == "pipeline" else {stage: cfg}
        gpu_pods = [
            (c["resources"]["limits"], g)
            for _, c, g in _pods(job["spec"]["rayClusterSpec"])
            if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
        ]
        if "train" in stages and stages["train"].use_gpu is True:
            t = stages["train"]
            assert sum(g["maxReplicas"] for _, g in gpu_pods) >= t.num_workers, name
            assert all(_qty(lim["cpu"]) >= t.cpus_per_worker for lim, _ in gpu_pods), name
        if "nightly" in stages:
            n = stages["nightly"]
            assert gpu_pods, f"{name}: the nightly job expects GPU actors"
            assert all(_qty(lim["cpu"]) >= n.cpus_per_actor for lim, _ in gpu_pods), name


def test_rayservice_serves_the_shipped_serve_config_within_its_cluster():
    serve_file = yaml.safe_load((CLUSTER / "serve" / "rerank.yaml").read_text())
    services = [d for docs in _manifests().values() for d in docs if d.get("kind") == "RayService"]
    assert services
    for svc in services:
        spec = svc["spec"]
        assert yaml.safe_load(spec["serveConfigV2"]) == serve_file, "serveConfigV2 drifted"
        assert spec["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade"}
        for app in serve_file["applications"]:
            args = AppArgs.model_validate(app["args"])
            workers = [
                (_qty(c["resources"]["limits"]["cpu"]), g["maxReplicas"])
                for n, c, g in _pods(spec["rayClusterConfig"])
                if n != "head"
            ]
            capacity = sum(cpu * n for cpu, n in workers)
            need = args.autoscaling.max_replicas * args.num_cpus
            assert need <= capacity, f"max_replicas x num_cpus = {need} > {capacity} CPUs"


def test_serve_config_points_at_the_app_builder_with_valid_args():
    conf = yaml.safe_load((CLUSTER / "serve" / "rerank.yaml").read_text())
    for app in conf["applications"]:
        module, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder)
        args = AppArgs.model_validate(app["args"])
        assert args.events.kind == "redis" and args.autoscaling.max_replicas > 1


def test_every_cluster_runs_the_project_image_at_the_dockerfiles_ray_version():
    import ray

    m = IMAGE_TAG.search((CLUSTER / "Dockerfile").read_text())
    assert m, "cluster/Dockerfile must build FROM rayproject/ray:<version>-py<X><Y>-gpu"
    version = m.group(1)
    assert version.split(".")[0] == ray.__version__.split(".")[0]
    images = set()
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == version, f"{name}: rayVersion {spec['rayVersion']}"
        images |= {c["image"] for _, c, _ in _pods(spec)}
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    images.add(launcher["docker"]["image"])
    assert len(images) == 1, f"manifests disagree on the image: {images}"


def test_cluster_launcher_yaml_passes_rays_schema_and_has_autoscaling_gpus():
    from ray.autoscaler._private.util import prepare_config, validate_config

    conf = prepare_config(yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text()))
    validate_config(conf)
    gpu = [t for t in conf["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu and all(t["max_workers"] > t["min_workers"] for t in gpu)


def test_runtime_env_is_valid_and_installs_the_package_from_the_working_dir():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}" in env["pip"]["packages"]
    assert any(x.startswith(".venv") for x in env["excludes"])


REFERENCE = re.compile(r"(?<![\w/.-])((?:jobs|cluster|notebooks)/[\w./-]*\w)")


@pytest.mark.parametrize(
    "doc",
    [
        "README.md",
        "Makefile",
        *[str(p.relative_to(ROOT)) for p in sorted(CLUSTER.rglob("*")) if p.is_file()],
    ],
)
def test_files_named_in_docs_and_manifests_exist(doc):
    path = ROOT / doc
    missing = {
        ref
        for ref in REFERENCE.findall(path.read_text())
        if "*" not in ref and "<" not in ref and not (ROOT / ref).exists()
    }
    assert not missing, f"{doc} names files that do not exist: {sorted(missing)}"


def test_cluster_readme_says_what_every_file_is_for():
    readme = (CLUSTER / "README.md").read_text()
    files = [p.relative_to(CLUSTER) for p in CLUSTER.rglob("*") if p.is_file()]
    unnamed = [str(f) for f in files if f.name != "README.md" and str(f) not in readme]
    assert not unnamed, f"cluster/README.md does not mention {unnamed}"


def test_the_grafana_dashboard_queries_only_metrics_the_app_or_serve_exports():
    from ray_app.serving.metrics import APP_METRICS, SERVE_METRICS

    dash = json.loads((ROOT / "cluster" / "grafana" / "rerank.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append(
        next(v for v in dash["templating"]["list"] if v["name"] == "application")["definition"]
    )
    exported = set()
    for m in APP_METRICS + SERVE_METRICS:
        suffixes = ("_bucket", "_sum", "_count") if m.kind == "histogram" else ("",)
        exported |= {m.name + s for s in suffixes}
    queried = {name for e in exprs for name in re.findall(r"\bray_[a-z_]+\b", e)}
    assert queried, "the dashboard queries nothing"
    assert queried <= exported, f"not exported: {sorted(queried - exported)}"
    # Every app metric has a panel.
    for m in APP_METRICS:
        assert any(n.startswith(m.name) for n in queried), f"{m.name} has no panel"
