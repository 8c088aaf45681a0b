"""The documentation cannot rot silently: links resolve, commands parse, the wheel ships the gin files.

* every relative link and image in README.md and docs/*.md points at a file that exists (and,
  for ``page.md#anchor``, at a heading of that page);
* every ``python -m components.run`` / ``components.seeds`` / ``components.suite`` command
  shown, in a code block or inline, names gin files that exist and resolves with
  ``--print-config`` from an empty folder;
* every test a docs page cites exists, and docs/configuration.md lists every shipped gin file;
* the README's code snippet runs;
* the wheel holds every module and gin file, and ``--print-config`` works from it alone;
* ``--help`` fits each option on one line and points to docs/configuration.md.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from components.run import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")  # inline code may wrap onto the next line
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def _prose(text: str) -> str:
    """The page without its fenced code blocks and inline code (where links are not links)."""
    return INLINE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, seen = set(), {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text()))
            if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto: are not checked here


def broken_links(page: Path) -> list[str]:
    """The relative links and images of ``page`` that do not resolve, with the reason."""
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """``(where, argv after the module)`` for each components.run / seeds / suite command."""
    text = page.read_text()
    candidates = []
    for block in FENCE.findall(text):
        candidates += block.replace("\\\n", " ").splitlines()
    candidates += [span.replace("\n", " ") for span in INLINE.findall(FENCE.sub("", text))]
    out = []
    for line in candidates:
        if not re.search(r"python -m components\.(run|seeds|suite)\b", line):
            continue
        tokens = shlex.split(line, comments=True)
        for i, token in enumerate(tokens[:-1]):
            if token == "-m" and tokens[i + 1] in ("components.run", "components.seeds", "components.suite"):
                rest = tokens[i + 2:]
                end = next((j for j, t in enumerate(rest) if t in ("&&", "||", ";", "|")), len(rest))
                if end:  # a bare `python -m components.run` names the module, it is no command
                    out.append((f"{page.name}: {line.strip()}", [tokens[i + 1], *rest[:end]]))
    return out


ALL_COMMANDS = [c for page in PAGES for c in commands(page)]


def test_the_readme_is_short_and_every_page_has_commands_to_check():
    assert len((ROOT / "README.md").read_bytes()) <= 12_000
    assert len(ALL_COMMANDS) >= 20  # the extraction itself works


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(page):
    assert links(page) or page.name in ("definitions.md",), f"{page.name} links nowhere"
    assert broken_links(page) == []


def test_the_link_check_catches_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Some Title: with (punctuation)\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#some-title-with-punctuation) [gone](missing.md) "
                    "[bad anchor](other.md#nothing) ![img](img/none.png) `[code](skipped.md)`\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "other.md#nothing", "img/none.png"]


@pytest.mark.parametrize("where, argv", ALL_COMMANDS, ids=[w for w, _ in ALL_COMMANDS])
def test_every_documented_command_resolves_from_an_empty_folder(where, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the repository: the shipped gin files must be found anyway
    module, args = argv[0], argv[1:]
    if module == "components.seeds":  # check what it would hand to components.run
        from components.seeds import build_parser

        parsed = build_parser().parse_args(args)
        args = [a for f in parsed.gin for a in ("--gin", f)]
        args += [a for b in parsed.gin_bindings for a in ("--gin-bindings", b)]
    if module == "components.suite":  # its first run, data file and sampled protocol included
        from components.suite import build_parser as suite_parser
        from components.suite import plan

        parsed = suite_parser().parse_args(args)
        first = plan(parsed)[1][0]
        args = [a for f in parsed.gin for a in ("--gin", f)]
        args += [a for b in first.bindings for a in ("--gin-bindings", b)]
    if "--gin" not in args:  # --list, --list-gin, --help
        with pytest.raises(SystemExit) if "--help" in args else contextlib.nullcontext():
            assert main(args) == 0
        return
    code = main([*args, "--print-config"])
    err = capsys.readouterr().err
    assert code == 0, f"{where}\n{err}"
    assert list(tmp_path.iterdir()) == []  # --print-config writes nothing


def test_a_command_with_a_wrong_gin_path_fails_the_check(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "page.md"
    page.write_text("```bash\npython -m components.run --gin gin/distil.gin  # typo\n```\n")
    [(_, argv)] = commands(page)
    assert main([*argv[1:], "--print-config"]) == 2
    assert "gin/distil.gin" in capsys.readouterr().err


def test_cited_tests_exist_and_every_gin_file_is_documented():
    source = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    defined = set(re.findall(r"^def (test_\w+)", source, re.M))
    for page in PAGES:
        cited = set(re.findall(r"`(test_\w+)`", page.read_text()))
        assert cited <= defined, f"{page.name} cites missing tests {sorted(cited - defined)}"
    for page in PAGES:  # every gin path a page names, in prose or code, exists
        named = set(re.findall(r"(?<![\w/.])gin/[\w/]+\.gin", page.read_text()))
        assert {n for n in named if not (ROOT / n).is_file()} == set(), page.name
    documented = set(re.findall(r"\(\.\./(gin/[\w/]+\.gin)\)", (ROOT / "docs/configuration.md").read_text()))
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gin").rglob("*.gin")}
    assert shipped - documented == set(), "add these to the table in docs/configuration.md"


def test_the_readme_snippet_runs():
    block = next(b for b in FENCE.findall((ROOT / "README.md").read_text()) if "import" in b)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 16, generator=g) * 6
    labeled_targets = torch.arange(7).repeat_interleave(12)
    stream_targets = torch.arange(10).repeat_interleave(12)
    names = {
        "labeled_features": centers[labeled_targets] + torch.randn(84, 16, generator=g),
        "labeled_targets": labeled_targets,
        "stream_features": centers[stream_targets] + torch.randn(120, 16, generator=g),
        "threshold": 60.0,
        "student_logits": torch.randn(8, 10, generator=g), "targets": torch.randint(0, 10, (8,)),
        "teacher_logits": torch.randn(8, 7, generator=g),
    }
    exec(compile(block, "README.md", "exec"), names)  # noqa: S102
    assert torch.isfinite(names["loss"])
    pooled_targets = stream_targets[names["is_new"]]
    assert (pooled_targets >= 7).float().mean() > 0.9  # the score pooled the new classes


# ---------------------------------------------------------------- the wheel and the command line


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package built as a wheel from a copy of the files it is made of (not the checkout)."""
    import shutil

    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("components", "graphs", "gin"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(work / "dist"), str(src)], check=True, capture_output=True)
    [built] = (work / "dist").glob("components-*.whl")
    return built


def test_the_wheel_ships_every_module_and_gin_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    gin_files = {f"components/gin/{p.relative_to(ROOT / 'gin').as_posix()}"
                 for p in (ROOT / "gin").rglob("*.gin")}
    modules = {p.relative_to(ROOT).as_posix()
               for d in ("components", "graphs") for p in (ROOT / d).rglob("*.py")}
    assert gin_files and gin_files - names == set()
    assert modules - names == set(), "add the missing packages to [tool.setuptools] packages"


def test_print_config_from_the_installed_wheel_in_an_empty_folder(wheel, tmp_path):
    site, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}  # the wheel's copy before the checkout's
    where = subprocess.run([sys.executable, "-c", "import components; print(components.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    for name in ("gin/distill.gin", "distill.gin"):
        out = subprocess.run([sys.executable, "-m", "components.run", "--gin", name, "--print-config",
                              "--gin-bindings", "include 'gin/data/fmnist.gin'"],
                             cwd=empty, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "run.graph = @lifecycle" in out.stdout and "'FashionMNIST'" in out.stdout
        assert "Path not found" not in out.stderr  # gin's lookups of other prefixes stay quiet
    assert list(empty.iterdir()) == []


def test_help_gives_each_option_one_line_and_points_to_the_docs(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = out.split("options:\n")[1].split("\n\n")[0].splitlines()
    assert all(re.match(r"  -\S.*\S  +\S", line) for line in options), options  # flag, then its help
    flags = {"--gin", "--gin-bindings", "--run-dir", "--print-config", "--list", "--list-gin", "--quiet",
             "--verbose"}
    assert flags <= {line.split()[0].rstrip(",") for line in options}
    assert "docs/configuration.md" in out.replace("\n", " ")
