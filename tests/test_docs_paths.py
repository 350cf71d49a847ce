"""The user docs point only at files, folders and modules the repository has.

Checked in README.md and docs/*.md:

- every inline code span (single backticks) that is one repo path: no whitespace, and
  its first part is a top-level entry of the repo (``agent/…``, ``tests/…``,
  ``deploy/``, ``pyproject.toml``…); with a ``::test_name`` or ``:name`` suffix the
  file must exist and contain that name (a ``:LINE`` suffix is dropped);
- every file path anywhere else in the text, prose and example commands alike, that
  starts with a repo folder and ends in a source or config extension
  (``tests/agent/test_api.py`` in a ``pytest`` command goes stale like any other);
- every inline span naming an ``edgefleet.…`` module (or an attribute of one);
- every relative link target ``[text](path)``.

Not checked, by rule: absolute paths (``/etc/…``, ``/opt/…``: the target machine's),
the reader's own paths (they do not start with a repo folder: ``agent.yaml``,
``./my-model.onnx``), paths with a placeholder or glob (``<…>``, ``{…}``, ``*``,
``$``, ``...``, an upper-case name such as ``NAME.json``), and what the project makes
at run time or by a build (``GENERATED``, each with what makes it). A path that fails
here is either stale or belongs in ``GENERATED``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_LEVEL = {
    p.name
    for p in ROOT.iterdir()
    if (not p.name.startswith(".") or p.name == ".ci") and not p.name.endswith(".egg-info")
}
FOLDERS = (
    "agent",
    "core",
    "fleet",
    "converters",
    "demo",
    "tests",
    "bench",
    "models",
    "deploy",
    "docs",
)
# Made at run time or by a build, not in the repository: prefix -> what makes it.
GENERATED = {
    "models/build": "python -m models (make demo)",
    "models/.cache": "python -m models (downloaded data sets' cache)",
    "bench/.venv-peers": "python -m bench serving (the peers' venv)",
    "bench/results/serving-partial.json": "python -m bench serving --quick/--only",
    "fleet-data": "edge-fleet serve / demo (the fleet's data directory)",
    "data": "edge-agent demo/serve (default data directory)",
}
PLACEHOLDER = re.compile(r"[<>{}*$]|\.\.\.|…|(^|/)(?!README\b)[A-Z][A-Z0-9_]+(\.|/|$)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
FILE = re.compile(
    rf"(?<![\w/.~-])((?:{'|'.join(FOLDERS)})/[\w./-]*\w"
    r"\.(?:py|md|sh|yaml|yml|conf|json|toml|service|txt|cfg|acl))\b"
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"^edgefleet(\.\w+)+$(?<!\.conf)(?<!\.yaml)(?<!\.toml)(?<!\.service)")


def _generated(rel: str) -> bool:
    return any(rel == g or rel.startswith(g + "/") for g in GENERATED)


def repo_paths(text: str) -> list[str]:
    """Repo paths named in ``text``: inline spans first, then file paths anywhere."""
    found = []
    for span in SPAN.findall(FENCE.sub("", text)):
        span = span.strip()
        if not span or any(c.isspace() for c in span) or PLACEHOLDER.search(span):
            continue
        path = re.sub(r":\d+(-\d+)?$", "", span).rstrip("/")
        if path.split("/")[0] in TOP_LEVEL and not _generated(path):
            found.append(path)
    for path in FILE.findall(text):
        if not PLACEHOLDER.search(path) and not _generated(path) and path not in found:
            found.append(path)
    return found


def module_names(text: str) -> list[str]:
    return [s.strip() for s in SPAN.findall(FENCE.sub("", text)) if MODULE.match(s.strip())]


def link_targets(text: str) -> list[str]:
    out = []
    for target in LINK.findall(FENCE.sub("", text)):
        target = target.split("#")[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            continue  # an anchor in the same page, a URL, an absolute path
        out.append(target)
    return out


def _exists(span: str) -> bool:
    """``path``, or ``path::name`` / ``path:name``: the file exists and has that name."""
    path, _, name = span.replace("::", ":", 1).partition(":")
    if not (ROOT / path).exists():
        return False
    name = name.split("[")[0]  # a parametrized test id
    return not name or re.search(rf"\b{re.escape(name)}\b", (ROOT / path).read_text()) is not None


def _resolves(name: str) -> bool:
    """``edgefleet.a.b`` is a module, or an attribute of the longest module prefix."""
    parts = name.split(".")
    for i in range(len(parts), 1, -1):
        module = ".".join(parts[:i])
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:
            continue
        obj: object = importlib.import_module(module)
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_point_at_what_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = [p for p in repo_paths(text) if not _exists(p)]
    missing += [
        f"link {t}"
        for t in link_targets(text)
        if not (doc.parent / t).exists() and not _generated(t)
    ]
    missing += [f"module {m}" for m in module_names(text) if not _resolves(m)]
    assert not missing, f"{doc.relative_to(ROOT)} names what is not in the repo: {missing}"


def test_the_rule_reads_what_it_should() -> None:
    """The extraction itself: repo paths found, the reader's and placeholders skipped."""
    text = (
        "See `agent/cli.py`, `tests/agent/test_api.py::test_x`, `docs/fleet.md:12`,\n"
        "`bench/results/NAME.json`, `deploy/mosquitto/edgefleet.conf` and `deploy/`;\n"
        "run `edge-agent serve --config models/build/agent.yaml` or read\n"
        "/etc/edgefleet/agent.yaml, `agent/<name>.py`, `docs/*.md`, `agent.yaml`,\n"
        "`edgefleet.agent.cli.main` and [the fleet](docs/fleet.md#x), [web](https://x.y).\n"
        "```\npytest tests/core/test_config.py `agent/nothing.md`\n```\n"
    )
    assert repo_paths(text) == [
        "agent/cli.py",
        "tests/agent/test_api.py::test_x",
        "docs/fleet.md",
        "deploy/mosquitto/edgefleet.conf",
        "deploy",
        "tests/agent/test_api.py",
        "tests/core/test_config.py",
        "agent/nothing.md",
    ]
    assert module_names(text) == ["edgefleet.agent.cli.main"]
    assert link_targets(text) == ["docs/fleet.md"]
    assert _exists("tests/agent/test_api.py") and _exists("core/durable.py:atomic_write")
    assert not _exists("core/durable.py:no_such_name") and not _exists("agent/nothing.md")
    assert _resolves("edgefleet.agent.cli.main") and not _resolves("edgefleet.agent.nope")
