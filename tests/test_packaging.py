"""The built wheel is one import package, ``edgefleet``, and nothing else.

The repo's folders ``core/``, ``agent/``, ``fleet/`` and ``converters/`` install as
``edgefleet.core`` … ``edgefleet.converters`` (pyproject's ``package-dir`` mapping).
The bare names are taken on PyPI and are what a user's own folders are called: a wheel
that installed ``agent`` could be shadowed by, or shadow, someone else's ``agent/``.
These tests build the wheel once with ``pip wheel --no-deps`` (the command of the
issue, with pyproject's own build requirements) and prove:

- its files are all under ``edgefleet/`` (plus its ``.dist-info``);
- installed into a throw-away venv, ``import edgefleet.agent.cli`` works from a folder
  that has its own ``agent/``, ``fleet/``, ``converters/`` and ``core/`` packages,
  each of which raises when imported;
- pyproject lists every package folder (setuptools does not find them: they are
  renamed on install, so a forgotten sub-package would silently be left out).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCTS = ("core", "agent", "fleet", "converters", "demo")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps`` of a copy of the tree (a build writes build/ and
    *.egg-info next to its sources, and the checkout is not ours to litter)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in PRODUCTS:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", src, "-w", work / "dist"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (built,) = (work / "dist").glob("edgefleet-*.whl")
    return built


def test_the_wheel_holds_only_the_edgefleet_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        tops = z.read(top_level[0]).decode().split() if top_level else []
    assert {n.split("/")[0] for n in names} == {"edgefleet", info}
    assert tops in ([], ["edgefleet"])
    # every product is in it, as a sub-package of edgefleet, with its code
    for product in PRODUCTS:
        assert f"edgefleet/{product}/__init__.py" in names
    assert "edgefleet/agent/cli.py" in names and "edgefleet/__init__.py" not in names


def test_installed_wheel_imports_beside_a_users_own_agent_folder(
    wheel: Path, tmp_path: Path
) -> None:
    """A data scientist's project folder with its own ``agent/`` (and ``core/``...): our
    code must import ``edgefleet.*`` only, so theirs is never picked up."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # The wheel alone, for real (no deps): pip installs it into the new venv...
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # ...and its dependencies come from this venv's site-packages, through a .pth line:
    # a path added that way is a plain sys.path entry, so the repo's editable install
    # (its own .pth there runs an import hook) stays out of the new venv.
    purelib = Path(sysconfig.get_paths()["purelib"])
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (site / "zz-deps.pth").write_text(f"{purelib}\n")

    user = tmp_path / "project"
    for name in PRODUCTS:
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(
            f"raise RuntimeError('the user\\'s own {name}/ was imported')\n"
        )
    (user / "agent" / "cli.py").write_text("raise RuntimeError('the user\\'s agent.cli')\n")
    code = (
        "import edgefleet.agent.cli, edgefleet.fleet.cli, edgefleet.converters.cli\n"
        "import edgefleet.agent, sys\n"
        "print(edgefleet.agent.cli.__file__)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        f" {PRODUCTS!r}))\n"
    )
    # `python -c` puts the working directory first on sys.path, like a notebook does.
    r = subprocess.run([python, "-c", code], cwd=user, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    cli_file, bare = r.stdout.strip().splitlines()
    assert Path(cli_file).is_relative_to(site / "edgefleet" / "agent"), cli_file
    assert bare == "[]"
    # The module form the systemd unit runs, from the same folder.
    r = subprocess.run(
        [python, "-m", "edgefleet.agent", "--help"],
        cwd=user,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stdout + r.stderr[-3000:]


def _package_folders() -> set[str]:
    """``edgefleet.*`` names of the repo's package folders (those with ``__init__.py``)."""
    found = set()
    for product in PRODUCTS:
        for init in (REPO / product).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO)
            if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            found.add(".".join(("edgefleet", *rel.parts)))
    return found


def test_pyproject_lists_every_package_folder() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {f"edgefleet.{p}": p for p in PRODUCTS}
    missing, stale = _package_folders() - listed, listed - _package_folders()
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    assert not stale, f"listed in pyproject.toml but no such package folder: {sorted(stale)}"
