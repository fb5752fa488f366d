"""The launchers in scripts/ (SLURM, torchrun, docker run), run against stand-ins for srun, torchrun and docker.

Each stand-in records the command line it was given, so the tests check what a cluster would really run: the DDP
layout matches the allocation, the run name survives a requeue, and every train.py flag exists in `train.py fit`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
TORCHRUN = REPO / "scripts" / "torchrun.sh"
DOCKER_RUN = REPO / "scripts" / "docker_run.sh"
LAUNCHERS = (SBATCH, TORCHRUN, DOCKER_RUN)

_RECORDER = """#!/bin/sh
printf '%s\\0' "$(basename "$0")" "$@" >> "$LAUNCH_LOG"
printf '\\n' >> "$LAUNCH_LOG"
env > "$LAUNCH_LOG.env"
"""


def run_launcher(
    script: Path, args: list[str], env: dict[str, str], tmp_path: Path, fakes: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[list[str]], dict[str, str]]:
    """Run ``script`` with stand-in programs first on PATH; returns the result, the recorded calls, their env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    programs = {"srun": _RECORDER, "torchrun": _RECORDER, "docker": _RECORDER, **(fakes or {})}
    for name, body in programs.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log, env_file = tmp_path / "launch.log", tmp_path / "launch.log.env"
    log.unlink(missing_ok=True)
    env_file.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RUN_NAME", "NNODES", "NPROC", "RDZV"))}
    full_env = {**base, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LAUNCH_LOG": str(log)}
    result = subprocess.run(["bash", str(script), *args], env=full_env, capture_output=True, text=True, timeout=60)
    calls = [line.split("\0")[:-1] for line in log.read_text().splitlines()] if log.exists() else []
    lines = env_file.read_text().splitlines() if env_file.exists() else []
    return result, calls, dict(line.split("=", 1) for line in lines if "=" in line)


def train_args(call: list[str], after: str = "train.py") -> list[str]:
    """The arguments given to train.py in a recorded call."""
    assert after in call, call
    return call[call.index(after) + 1 :]


def last_value(args: list[str], flag: str) -> str:
    """The value of the last ``flag VALUE`` in ``args`` (LightningCLI: the last one wins)."""
    positions = [i for i, arg in enumerate(args) if arg == flag]
    assert positions, f"{flag} not passed: {args}"
    return args[positions[-1] + 1]


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined; comment markers dropped so usage examples in comments count too."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") and not line.startswith(("#!", "#SBATCH")):
            line = line.lstrip("#").strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


def flags_passed_to_train_py(script: Path) -> set[str]:
    """Every ``--flag`` written after ``train.py`` or after the script's own name (whose arguments go to train.py)."""
    flags: set[str] = set()
    for line in logical_lines(script.read_text()):
        for anchor in ("train.py", script.name):
            for part in line.split(anchor)[1:]:
                flags.update(re.findall(r"(?:^|[\s+\"'(])(--[A-Za-z][\w.-]*)", part))
    return flags


def config_init_args_keys(group: str) -> set[str]:
    """Keys under ``<group>.init_args`` in any config in configs/."""
    keys: set[str] = set()
    for path in REPO.glob("configs/**/*.yaml"):
        section = (yaml.safe_load(path.read_text()) or {}).get(group) or {}
        keys.update((section.get("init_args") or {}).keys())
    return keys


def assert_accepted(flag: str, fit_help: str) -> None:
    """``flag`` is in ``train.py fit --help``; a subclass group's init_args key must be one the configs use."""
    if re.search(rf"(?:^|[\s\[,]){re.escape(flag)}(?=[\s\]=,+]|$)", fit_help, re.M):
        return
    group, _, rest = flag[2:].partition(".")
    subclass_group = re.search(rf"--{re.escape(group)} CONFIG \| CLASS_PATH_OR_NAME", fit_help)
    assert subclass_group and rest.startswith("init_args."), f"{flag} is not a `train.py fit` option"
    key = rest.removeprefix("init_args.").split(".")[0]
    assert key in config_init_args_keys(group), f"{flag}: no config sets {group}.init_args.{key}"


@pytest.fixture(scope="module")
def fit_help() -> str:
    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_scripts_parse_and_fail_fast(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


def test_sbatch_header() -> None:
    lines = SBATCH.read_text().splitlines()
    # NOTE: sbatch stops reading #SBATCH lines at the first command
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    header = [line for line in lines[:first_command] if line.startswith("#SBATCH")]
    assert header and len(header) == sum(line.startswith("#SBATCH") for line in lines)
    options = dict(line.removeprefix("#SBATCH").strip().partition("=")[::2] for line in header)
    assert options["--signal"] == "SIGUSR1@90"
    assert "--requeue" in options
    assert options["--open-mode"] == "append"
    assert options["--ntasks-per-node"] == options["--gpus-per-node"], "one task per GPU"
    assert options["--job-name"] not in ("bash", "interactive"), "Lightning ignores SLURM for these job names"


def slurm_env(**extra: str) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "strata",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_CPUS_PER_TASK": "6",
        "SLURM_SUBMIT_DIR": str(REPO),
        **extra,
    }


def test_sbatch_layout_follows_the_allocation(tmp_path: Path) -> None:
    user_args = ["--config", "configs/demo/classify.yaml", "--trainer.devices", "3"]
    result, calls, env = run_launcher(SBATCH, user_args, slurm_env(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(calls) == 1 and calls[0][0] == "srun"
    assert calls[0][1] == "--kill-on-bad-exit=1"  # a dead task ends the step, its peers do not hang
    args = train_args(calls[0])
    assert args[: 1 + len(user_args)] == ["fit", *user_args]
    assert last_value(args, "--trainer.devices") == "4"
    assert last_value(args, "--trainer.num_nodes") == "2"
    assert last_value(args, "--trainer.strategy") == "ddp"
    assert env["SRUN_CPUS_PER_TASK"] == "6", "srun (SLURM >= 22.05) does not inherit --cpus-per-task"


def test_sbatch_run_name_survives_a_requeue(tmp_path: Path) -> None:
    names = []
    for restart in ("0", "1"):
        result, calls, _ = run_launcher(SBATCH, [], slurm_env(SLURM_RESTART_COUNT=restart), tmp_path)
        assert result.returncode == 0, result.stderr
        names.append(last_value(train_args(calls[0]), "--name"))
    assert names[0] == names[1] and "4242" in names[0]
    result, calls, _ = run_launcher(SBATCH, [], slurm_env(RUN_NAME="my-run"), tmp_path)
    assert last_value(train_args(calls[0]), "--name") == "my-run"


def test_sbatch_outside_slurm_says_so(tmp_path: Path) -> None:
    result, calls, _ = run_launcher(SBATCH, [], {}, tmp_path)
    assert result.returncode != 0 and not calls
    assert "sbatch" in result.stderr


def test_torchrun_single_node(tmp_path: Path) -> None:
    gpus = "#!/bin/sh\nprintf 'GPU 0: A\\nGPU 1: B\\nGPU 2: C\\n'\n"
    result, calls, _ = run_launcher(TORCHRUN, ["--config", "x.yaml"], {}, tmp_path, {"nvidia-smi": gpus})
    assert result.returncode == 0, result.stderr
    (call,) = calls
    launcher = call[: call.index("train.py")]
    assert last_value(launcher, "--nnodes") == "1"
    assert last_value(launcher, "--nproc_per_node") == "3"
    assert last_value(launcher, "--rdzv_backend") == "c10d"
    assert last_value(launcher, "--rdzv_endpoint") == "localhost:0"
    args = train_args(call)
    assert args[:3] == ["fit", "--config", "x.yaml"]
    assert "--name" not in args, "without RUN_NAME, train.py names the run from the rendezvous id"
    assert last_value(args, "--trainer.devices") == "3"
    assert last_value(args, "--trainer.num_nodes") == "1"
    assert last_value(args, "--trainer.strategy") == "ddp"


def test_torchrun_multi_node(tmp_path: Path) -> None:
    result, calls, _ = run_launcher(TORCHRUN, [], {"NNODES": "2", "NPROC": "8"}, tmp_path)
    assert result.returncode != 0 and not calls, "multi-node needs a shared endpoint and run name"
    assert "RDZV_ENDPOINT" in result.stderr
    env = {"NNODES": "2", "NPROC": "8", "RDZV_ENDPOINT": "node0:29400", "RUN_NAME": "in1k"}
    result, calls, _ = run_launcher(TORCHRUN, [], env, tmp_path)
    assert result.returncode == 0, result.stderr
    (call,) = calls
    launcher, args = call[: call.index("train.py")], train_args(call)
    assert last_value(launcher, "--rdzv_endpoint") == "node0:29400"
    assert last_value(launcher, "--rdzv_id") == "in1k"
    assert last_value(args, "--name") == "in1k"
    assert last_value(args, "--trainer.num_nodes") == "2"
    assert last_value(args, "--trainer.devices") == last_value(launcher, "--nproc_per_node") == "8"


def test_docker_run_mounts_the_image_volumes(tmp_path: Path) -> None:
    env = {
        "IMAGE": "strata-test",
        "DATA_DIR": str(tmp_path / "data"),
        "CHECKPOINT_DIR": str(tmp_path / "runs"),
        "WANDB_API_KEY": "secret-key",
    }
    result, calls, _ = run_launcher(DOCKER_RUN, ["--config", "configs/demo/classify.yaml"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    build, run = calls
    assert build[:2] == ["docker", "build"] and f"USER_UID={os.getuid()}" in build
    assert run[:2] == ["docker", "run"]
    assert "--ipc=host" in run and last_value(run, "--gpus") == "all"
    volumes = re.search(r"^VOLUME\s+(\[.*\])", (REPO / "Dockerfile").read_text(), re.M)
    assert volumes
    mounts = {v.split(":")[1]: v.split(":")[0] for i, v in enumerate(run) if run[i - 1] == "--volume"}
    assert mounts == {"/data": env["DATA_DIR"], "/workspace/checkpoints": env["CHECKPOINT_DIR"]}
    assert set(mounts) == set(json.loads(volumes.group(1)))
    assert last_value(run, "--env") == "WANDB_API_KEY", "passed by name: the key never shows on a command line"
    assert not any("secret-key" in arg for arg in build + run)
    assert train_args(run, after="strata-test") == ["fit", "--config", "configs/demo/classify.yaml"]


def test_flags_for_train_py_exist(tmp_path: Path, fit_help: str) -> None:
    flags: set[str] = set()
    for script in LAUNCHERS:
        flags |= flags_passed_to_train_py(script)
    # NOTE: what the launchers really pass, recorded, on top of what their text shows
    _, calls, _ = run_launcher(SBATCH, [], slurm_env(), tmp_path)
    env = {"NNODES": "2", "NPROC": "8", "RDZV_ENDPOINT": "node0:29400", "RUN_NAME": "in1k"}
    _, more, _ = run_launcher(TORCHRUN, [], env, tmp_path)
    flags |= {arg for call in calls + more for arg in train_args(call) if arg.startswith("--")}
    expected = {"--config", "--name", "--trainer.num_nodes", "--trainer.devices", "--trainer.strategy"}
    assert expected <= flags, "the flag parser missed the launchers' own flags"
    for flag in sorted(flags):
        assert_accepted(flag, fit_help)


def test_flag_check_rejects_unknown_flags(fit_help: str) -> None:
    with pytest.raises(AssertionError):
        assert_accepted("--trainer.num_node", fit_help)
    with pytest.raises(AssertionError):
        assert_accepted("--data.init_args.rot", fit_help)
    assert_accepted("--data.init_args.root", fit_help)
