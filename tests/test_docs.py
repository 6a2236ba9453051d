"""The README is a front page and docs/ is current: the README stays short, opens with the
two commands CI runs, links every docs/ page, and every relative link in it and in docs/
resolves; the generated pages are what docs/generate.py renders from the code now."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 300
LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of a Markdown link or image


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _local_links(page: Path) -> list[str]:
    """The relative targets ``page`` links to, anchors and web addresses left out."""
    targets = (t.split("#")[0] for t in LINK.findall(page.read_text()))
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]


def _headings(page: Path) -> list[str]:
    """The Markdown headings of ``page`` (outside fenced code), without the #s."""
    found, fenced = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append(line.lstrip("#").strip())
    return found


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub makes for ``page``'s headings: lower case, punctuation but hyphens
    and underscores dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _headings(page):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _broken(page: Path) -> list[str]:
    """The relative links of ``page`` whose file or heading anchor does not exist."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path) if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    return broken


def test_the_readme_is_a_front_page_of_at_most_300_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_the_first_commands_of_the_readme_are_the_two_ci_runs():
    first_block = re.search(r"```[a-z]*\n(.*?)```", README.read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make test" in ci and re.search(r"^demo:", makefile, re.M)


def test_the_readme_links_every_docs_page_and_each_link_resolves():
    assert not _broken(README), f"README.md has broken links: {_broken(README)}"
    pages = {p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md")}
    unlinked = sorted(pages - set(_local_links(README)))
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_relative_link_in_docs_resolves(page):
    broken = _broken(DOCS / page)
    assert not broken, f"docs/{page} has links to missing files or headings: {broken}"


def _command_flags() -> dict[str, list[str]]:
    """Every command of ``convforge`` -> its long options, from the parsers the CLI builds."""
    from convforge import cli, extras
    from convforge.cli.arguments import Parser

    def flags(parser) -> list[str]:
        out = []
        for action in parser._actions:  # argparse keeps no public list of its options
            if isinstance(action, argparse._SubParsersAction):
                out += [f for sub in action.choices.values() for f in flags(sub)]
            else:
                out += [s for s in action.option_strings if s.startswith("--") and s != "--help"]
        return out

    found = {}
    for name, command in cli.COMMANDS.items():
        extras.require(f"convforge {name}", *command.needs)
        parser = Parser(prog=f"convforge {name}")
        importlib.import_module(f"convforge.cli.{command.group}").PARSERS[name](parser)
        found[name] = flags(parser)
    return found


def test_the_command_reference_names_every_option_of_every_command():
    text = (DOCS / "commands.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    missing = {}
    for name, flags in _command_flags().items():
        heading = re.compile(rf"`convforge {re.escape(name)}[` ]")
        mine = [s for s in sections if heading.search(s.splitlines()[0])]
        mine = mine or [s for s in sections if f"`convforge {name}`" in s]
        assert mine, f"docs/commands.md has no section for convforge {name}"
        absent = [
            f for f in flags
            if not re.search(rf"(?<![\w-]){re.escape(f.replace('--no-', '--'))}(?![\w-])",
                             mine[0])
        ]  # fmt: skip
        if absent:
            missing[name] = absent
    assert not missing, f"options docs/commands.md does not mention, by command: {missing}"


def test_the_generated_pages_are_current():
    stale = [
        path.relative_to(ROOT).as_posix()
        for path, text in _generator().render_all().items()
        if not path.is_file() or path.read_text() != text
    ]
    assert not stale, f"stale: {stale}; run .venv/bin/python docs/generate.py and commit them"


def test_the_backends_page_holds_nothing_about_this_machine():
    """Rendered from a report whose machine facts differ, the page is the same: it cannot
    depend on which backends happen to be available where it was generated."""
    generate = _generator()
    report = {
        "gpu_stack": {"driver": "here"},
        "backends": [
            {"backend": "ort-cpu", "available": True, "why": "", "options": []},
            {"backend": "tensorrt", "available": False, "why": "no GPU", "options": [],
             "a_key_added_later": 1},
        ],
    }  # fmt: skip
    other = {
        "gpu_stack": {},
        "backends": [
            {"backend": "ort-cpu", "available": False, "why": "elsewhere", "options": []},
            {"backend": "tensorrt", "available": True, "why": "", "options": []},
        ],
    }

    def describe(name):
        return {"summary": f"{name} runs.", "gpu": name == "tensorrt"}

    page = generate.render_backends(report, describe)
    assert page == generate.render_backends(other, describe)
    assert "no GPU" not in page and "## tensorrt" in page


def _layout_modules() -> set[str]:
    """The module paths the folder layout of docs/design.md lists (its first code block after
    "## Folder layout": one entry per line, two spaces per level, folders ending in /)."""
    text = (DOCS / "design.md").read_text().split("## Folder layout", 1)[1]
    block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    found, stack = set(), []
    for line in block.splitlines():
        entry = line.strip().split(" ")[0]
        if not entry or not re.fullmatch(r"[\w.]+/?", entry):
            continue  # a description's second line
        depth = (len(line) - len(line.lstrip())) // 2
        stack[depth:] = [entry.rstrip("/")]
        if not entry.endswith("/"):
            found.add("/".join(stack))
    return found


def test_the_design_layout_lists_every_module_and_no_other():
    actual = {p.relative_to(ROOT).as_posix() for p in (ROOT / "convforge").rglob("*.py")}
    listed = _layout_modules()
    assert listed == actual, (
        f"docs/design.md's layout misses {sorted(actual - listed)} and lists modules that "
        f"do not exist: {sorted(listed - actual)}"
    )
