"""The docs stay true: every `cvt-export`/`cvt-bench` command shown in the README and in docs/
parses (its subcommand and every option exist: the parser reads the line with --help added, which
stops before any work), and every page in docs/ is in the site's navigation."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from cvt_export.cli import bench, export

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
APPS = {"cvt-export": export.app, "cvt-bench": bench.app}


def shown_commands(page: Path) -> list[str]:
    """Command lines in the page's sh/text blocks (a `$ ` prompt is dropped, `\\` continuations
    joined, `# comments` cut); lines that show a syntax (`[--option]`, `A|B` choices) are not
    runnable and are left out."""
    found = []
    for block in re.findall(r"```(?:sh|text)\n(.*?)```", page.read_text(), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.removeprefix("$ ").split("  #")[0].split(" # ")[0].strip()
            if line.split(" ", 1)[0] in APPS and "[" not in line and "|" not in line:
                found.append(line)
    return found


CASES = [(page.name, line) for page in PAGES for line in shown_commands(page)]


def test_the_pages_show_commands() -> None:
    names = {name for name, _ in CASES}
    assert {"README.md", "int8-and-tune.md", "benchmark.md", "triton.md"} <= names
    assert len(CASES) >= 30


@pytest.mark.parametrize(("page", "line"), CASES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(CASES)])
def test_a_shown_command_parses(page: str, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = shlex.split(line)
    command = get_command(APPS[argv[0]])
    code = command.main([*argv[1:], "--help"], prog_name=argv[0], standalone_mode=False)
    assert code == 0, f"{page}: {line}"
    assert "Usage:" in capsys.readouterr().out


def test_every_page_is_in_the_navigation() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = {next(iter(entry.values())) for entry in config["nav"]}
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}
    readme = (ROOT / "README.md").read_text()
    for page in listed - {"index.md"}:
        assert f"(docs/{page}" in readme, f"the README does not point at docs/{page}"
