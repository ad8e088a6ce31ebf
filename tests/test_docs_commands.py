"""Every shell command in README.md and docs/ is run, or marked not run with its reason.

A command is a line of a ```bash / ```sh / ```console block (console: the lines after `$ `;
backslash continuations joined). It is not run when an HTML comment `<!-- not run: reason -->`
stands right before its block or the line ends with `# not run: reason`; every other command
runs on the tiny profile (`--profile tiny` / `-P profile=tiny` substituted or added) in one
temporary folder with one temporary MLflow store, in pipeline order, so one tiny pipeline
serves every block. Run or not, every `steps.X` a command names must answer `--help`, and every
option a command passes must be one that program (or its MLproject entry point) accepts: a
renamed option fails here.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN_BLOCK = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
NOT_RUN_LINE = re.compile(r"#\s*not run:\s*(\S.*)$")
STEP = re.compile(r"-m steps\.(\w+)")
MLFLOW_RUN = re.compile(r"\bmlflow run (\S+)")
# Pipeline order: a later step reads what an earlier one left in the shared store.
ORDER = {"pipeline.data.synthetic": 0, "stage1": 1, "validate": 2, "stage2": 3, "evaluate": 4,
         "main": 5, "mlflow run": 6}
TIMEOUT_S = 300


@dataclass(frozen=True)
class Command:
    text: str
    where: str  # file:line
    not_run: str | None  # the reason, when marked


def _commands(path: Path) -> list[Command]:
    lines, out = path.read_text().splitlines(), []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        i = end + 1
        if lang not in ("bash", "sh", "console"):
            continue
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        block_reason = NOT_RUN_BLOCK.search(before)
        pending, first = "", 0
        for j in range(start + 1, end):
            line = lines[j]
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if not pending:
                first = j
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            reason = NOT_RUN_LINE.search(pending)
            out.append(Command(pending.strip(), f"{path.relative_to(ROOT)}:{first + 1}",
                               block_reason.group(1) if block_reason else
                               reason.group(1) if reason else None))
            pending = ""
    return out


ALL = [c for path in DOCS for c in _commands(path)]


def _kind(text: str) -> str:
    if MLFLOW_RUN.search(text):
        return "mlflow run"
    step = STEP.search(text)
    if step:
        return step.group(1)
    return "pipeline.data.synthetic" if "pipeline.data.synthetic" in text else "other"


def _shell_words(text: str) -> list[str]:
    return shlex.split(NOT_RUN_LINE.sub("", text), comments=True)


@lru_cache(maxsize=None)
def _help(step: str) -> str:
    done = subprocess.run([sys.executable, "-m", f"steps.{step}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=_env(ROOT))
    assert done.returncode == 0, f"steps.{step} --help failed:\n{done.stderr[-2000:]}"
    return done.stdout


def _accepts(step: str, option: str) -> bool:
    return re.search(rf"(^|[\s,]){re.escape(option)}([\s,=]|$)", _help(step), re.M) is not None


def _mlproject_params(project: str, entry: str) -> set[str]:
    spec = yaml.safe_load((ROOT / project / "MLproject").read_text())
    return set(spec["entry_points"][entry].get("parameters", {}))


def _option_problems(command: Command) -> list[str]:
    words, problems = _shell_words(command.text), []
    step = STEP.search(command.text)
    if step:
        name = step.group(1)
        after = words[words.index(f"steps.{name}") + 1:]
        for word in after:
            option = word.split("=", 1)[0]
            if option.startswith("--") and not _accepts(name, option):
                problems.append(f"steps.{name} does not accept {option}")
    run = MLFLOW_RUN.search(command.text)
    if run:
        entry = words[words.index("-e") + 1]
        declared = _mlproject_params(run.group(1), entry)
        _help(entry)
        for k, word in enumerate(words):
            if word == "-P":
                key = words[k + 1].split("=", 1)[0]
                # Undeclared parameters reach the program as `--key value`.
                if key not in declared and not _accepts(entry, f"--{key}"):
                    problems.append(f"entry point {entry}: neither MLproject nor steps.{entry} "
                                    f"accepts -P {key}")
    return problems


def test_every_command_is_run_or_marked_with_a_reason():
    assert ALL, "no commands found"
    for command in ALL:
        if command.not_run is not None:
            assert len(command.not_run) > 5, f"{command.where}: say why it is not run"


@pytest.mark.parametrize("command", ALL, ids=[c.where for c in ALL])
def test_every_option_a_command_passes_is_accepted(command):
    assert not _option_problems(command), f"{command.where}: {command.text}"


def _tiny(text: str) -> str:
    """The command on the tiny profile, with the venv's programs."""
    if MLFLOW_RUN.search(text):
        text = re.sub(r"-P profile=\S+", "-P profile=tiny", text)
        if "-P profile=tiny" not in text:
            text += " -P profile=tiny"
    elif STEP.search(text) and "--help" not in text:
        text = re.sub(r"--profile[ =]\S+", "--profile tiny", text)
        if "--profile tiny" not in text:
            text += " --profile tiny"
    text = re.sub(r"^\.venv/bin/", f"{BIN}/", text)
    return re.sub(r"^python\b", sys.executable, text)


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="true", MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               REPORT_VLM_PROJECT_DIR=str(ROOT))
    return env


@pytest.mark.slow
def test_every_command_not_marked_runs_on_the_tiny_profile(tmp_path):
    runnable = [c for c in ALL if c.not_run is None]
    unknown = [c for c in runnable if _kind(c.text) == "other" and "mlflow" not in c.text]
    assert not unknown, "commands neither runnable here nor marked `not run: <reason>`: " + \
        "; ".join(f"{c.where}: {c.text}" for c in unknown)
    # Each distinct command once; within a step, commands with more options first, so the
    # plain (default-recipe) one is what the next step reads.
    todo = {}
    for command in runnable:
        todo.setdefault(_tiny(command.text), command)
    ordered = sorted(todo.items(), key=lambda item: (ORDER.get(_kind(item[1].text), 7),
                                                    -len(_shell_words(item[0]))))
    for text, command in ordered:
        text = text.replace("mlflow run . ", f"mlflow run {ROOT} ")
        done = subprocess.run(["bash", "-c", text], cwd=tmp_path, env=_env(tmp_path),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        assert done.returncode == 0, (f"{command.where}: `{text}` exited {done.returncode}:\n"
                                      f"{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
