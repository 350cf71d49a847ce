"""Patterns that must not appear in code that handles outside data (issue 6 §3).

The agent and the fleet read bundles, HTTP bodies and MQTT payloads from the
network: nothing they parse may run code (pickle, eval/exec, unsafe YAML, ``.npz``
with pickled objects) and no shell command may be built from data. The converters
may load a joblib/pickle file a data scientist hands them (their own trained model;
the CLI warns) and nothing else. The scan reads the source as text with Python's own
tokenizer, so comments and strings that merely mention the words do not count.
"""

from __future__ import annotations

import functools
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "agent", "fleet", "converters", "demo", "models", "bench")
# File -> patterns it may use, and why.
ALLOWED: dict[str, set[str]] = {
    # `edge-convert sklearn` loads the data scientist's own fitted estimator (joblib is
    # a pickle); the CLI says so and the agent never sees these files.
    "converters/sklearn.py": {"joblib.load"},
}
FORBIDDEN = {
    "pickle": re.compile(r"\b(c?pickle|dill|shelve)\.(loads?|Unpickler)\b"),
    "joblib.load": re.compile(r"\bjoblib\.load\b"),
    "eval/exec": re.compile(r"(?<![.\w])(eval|exec)\s*\("),
    "shell=True": re.compile(r"\bshell\s*=\s*True\b"),
    "os.system/popen": re.compile(r"\bos\.(system|popen)\s*\("),
    "yaml.load": re.compile(r"\byaml\.(load|load_all|unsafe_load|full_load)\s*\("),
    # The call's arguments may hold one level of parentheses: np.load(io.BytesIO(b), ...).
    "np.load with pickles": re.compile(
        r"\bnp\.load\s*\((?!(?:[^()]|\([^()]*\))*allow_pickle\s*=\s*False)"
    ),
    "torch.load": re.compile(r"\btorch\.load\s*\((?!(?:[^()]|\([^()]*\))*weights_only\s*=\s*True)"),
}


@functools.cache
def _code_only(path: Path) -> str:
    """The file's source with comments and string literals blanked out."""
    out = []
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    for tok in tokens:
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            out.append(" ")
        else:
            out.append(tok.string)
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            out.append("\n")
        else:
            out.append(" ")
    # Rejoin "np . load (" into "np.load(" so the patterns read naturally.
    return re.sub(r"\s*\.\s*", ".", re.sub(r"[ \t]+\(", "(", "".join(out)))


def _sources() -> list[Path]:
    files = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if "/.venv" in rel or rel.startswith("bench/peers/") or "/build/" in rel:
                continue
            files.append(path)
    return files


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_no_code_runs_from_data(name: str) -> None:
    pattern = FORBIDDEN[name]
    hits = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if name in ALLOWED.get(rel, set()):
            continue
        for line in _code_only(path).splitlines():
            if pattern.search(line):
                hits.append(f"{rel}: {line.strip()[:120]}")
    assert not hits, f"{name} in:\n" + "\n".join(hits)


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The patterns are not dead: each one catches a real use in a sample file."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle, subprocess, yaml, numpy as np, os, torch, joblib\n"
        "pickle.loads(b'')\n"
        "eval('1')\n"
        "subprocess.run('ls', shell=True)\n"
        "os.system('ls')\n"
        "yaml.load('a: 1')\n"
        "np.load('x.npz')\n"
        "torch.load('m.pt')\n"
        "joblib.load('m.joblib')\n"
        "# eval( in a comment does not count\n"
        "s = 'eval(1) in a string does not count'\n"
        "np.load('y.npz', allow_pickle=False)\n"
        "np.load(io.BytesIO(b), allow_pickle=False)\n"
    )
    code = _code_only(sample).splitlines()
    found = {name for name, p in FORBIDDEN.items() if any(p.search(line) for line in code)}
    assert found == set(FORBIDDEN)
    assert sum(1 for line in code if FORBIDDEN["eval/exec"].search(line)) == 1
    assert sum(1 for line in code if FORBIDDEN["np.load with pickles"].search(line)) == 1
