"""The documentation stays true: README.md is a short front page, the depth is in docs/, every
link and anchor resolves, and the tables that mirror the code (settings, the tree) match it."""
import re
import subprocess
from pathlib import Path

import pytest

from repo import REPO, load_stack_module
from test_config import dockerfile_env, ini_defaults

pytestmark = pytest.mark.local

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
FRONT_PAGE_MAX_LINES = 220
FENCE = re.compile(r"^(```|~~~)")
# [text](target) and [text](target "title"); images too. Reference definitions: [label]: target
INLINE_LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")


def prose_lines(text):
    """The lines of a Markdown text outside fenced code blocks, inline code removed."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)


def github_anchor(heading):
    """The id GitHub gives a heading: its rendered text stripped, lowercased, every character
    that is not a letter, digit, space, hyphen or underscore removed, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a Markdown file, repeated ones with GitHub's -1, -2 suffixes."""
    seen, result = {}, set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def links(path):
    """(line number, target) of every link in a Markdown file, outside code."""
    for number, line in enumerate(prose_lines(path.read_text()), 1):
        for target in INLINE_LINK.findall(line):
            yield number, target
        match = REFERENCE_DEFINITION.match(line)
        if match:
            yield number, match.group(1)


def broken_links(path):
    broken = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}: link {target!r}"
        if not linked.exists():
            broken.append(f"{where}: no such file")
        elif REPO not in linked.parents and linked != REPO:
            broken.append(f"{where}: outside the repository")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{where}: no heading #{anchor} in {linked.relative_to(REPO)}")
    return broken


def test_github_anchor_rules():
    assert github_anchor("Autobahn|Testsuite: stock uWSGI vs this project's build") == \
        "autobahntestsuite-stock-uwsgi-vs-this-projects-build"
    assert github_anchor("Flask-uWSGI-WebSocket 0.6.1") == "flask-uwsgi-websocket-061"
    assert github_anchor("`make test-compose`") == "make-test-compose"
    assert github_anchor("Limits: what one client can take from the others") == \
        "limits-what-one-client-can-take-from-the-others"


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Limits\n\n```text\n## not a heading\n```\n\n## Limits\n\n### Limits\n")
    assert anchors(page) == {"title", "limits", "limits-1", "limits-2"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_the_link_parser_finds_links():
    found = {target for _, target in links(REPO / "README.md")}
    assert "docs/layout.md" in found and "https://pypi.org/project/Flask-uWSGI-WebSocket/" in found
    assert any("#" in target for target in found)


def test_the_front_page_is_short_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= FRONT_PAGE_MAX_LINES
    linked = {(REPO / target.partition("#")[0]).resolve() for _, target in links(REPO / "README.md")}
    assert {page.resolve() for page in DOCS.glob("*.md")} <= linked
    assert re.search(r"^```mermaid\nflowchart LR\n", readme, re.M), "the architecture picture"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda page: page.name)
def test_every_docs_page_starts_with_one_sentence_on_what_it_covers(page):
    lines = page.read_text().splitlines()
    assert re.match(r"^# \S", lines[0]), "the page starts with its title (H1)"
    assert lines[1] == "" and lines[3] == "", "then one paragraph of one line"
    sentence = re.sub(r"`[^`]*`", "code", lines[2])
    assert re.match(r"^[A-Z][^#|>!<]", sentence) and sentence.endswith("."), lines[2]
    assert not re.search(r"[.!?] [A-Z]", sentence), f"more than one sentence: {lines[2]!r}"


def configuration_table():
    """{variable: default cell} of every variable table in docs/configuration.md."""
    text = (DOCS / "configuration.md").read_text()
    return dict(re.findall(r"^\| `(\w+)` \| (.*?) \| .* \|$", text, re.M))


def settings_the_code_reads():
    """{variable: [defaults]} for every setting the stack reads: compose's ${VAR:-default}, the
    ini's if-not-env blocks, make run's DEFAULTS, nginx's image ENV, the apps' and tests' reads."""
    read = {}

    def add(name, default=None):
        read.setdefault(name, [])
        if default is not None:
            read[name].append(default.replace(str(REPO) + "/", ""))

    compose_text = (REPO / "docker-compose.yml").read_text()
    compose_text = "\n".join(line for line in compose_text.splitlines() if not line.lstrip().startswith("#"))
    for name, default in re.findall(r"\$\{(\w+):-([^}]*)\}", compose_text):
        add(name, default)
    for name, default in ini_defaults().items():
        add(name, default)
    for name, default in load_stack_module().DEFAULTS.items():
        add(name, default)
    for name, default in dockerfile_env("nginx").items():
        add(name, default)
    readers = [*REPO.glob("common/wsstack/*.py"), *REPO.glob("*-app/*.py"), REPO / "tests" / "stack.py",
               REPO / "tests" / "conftest.py"]
    for path in readers:
        calls = re.findall(r'(?:env_whole_number|os\.environ\.get|os\.getenv)\(\s*"(\w+)"(?:,\s*("[^"]*"))?',
                           path.read_text())
        for name, default in calls:
            add(name, default[1:-1] if default else None)
    return read


def test_every_setting_is_documented_with_its_default():
    table = configuration_table()
    read = settings_the_code_reads()
    assert set(read) - set(table) == set()
    for name, defaults in read.items():
        cell = table[name]
        for default in defaults:
            if default == "":
                assert re.match(r"^(empty|unset)\b", cell), f"{name}: default empty, table says {cell!r}"
            else:
                assert f"`{default}`" in cell, f"{name}: default {default!r}, table says {cell!r}"


def test_every_documented_setting_exists():
    """No variable stays in the table after the code stopped reading it."""
    sources = [REPO / path for path in repository_files()
               if not path.endswith((".md", ".png")) and (REPO / path).is_file()]
    text = "\n".join(path.read_text(errors="replace") for path in sources)
    assert {name for name in configuration_table() if not re.search(rf"\b{name}\b", text)} == set()


def layout_tree():
    """Paths listed in docs/layout.md's tree (directories end with /)."""
    layout = (DOCS / "layout.md").read_text()
    block = re.search(r"^```text\n\.\n(.*?)^```", layout, re.M | re.S).group(1)
    paths, parents = set(), []
    for line in block.splitlines():
        match = re.match(r"^((?:│   |    )*)(?:├── |└── )(\S+)", line)
        assert match, f"unexpected line in the docs/layout.md tree: {line!r}"
        depth = len(match.group(1)) // 4
        parents = parents[:depth] + [match.group(2)]
        paths.add("/".join(name.rstrip("/") for name in parents) + ("/" if match.group(2).endswith("/") else ""))
    return paths


def repository_files():
    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
        capture_output=True, text=True, check=True,
    )
    return {path for path in result.stdout.splitlines() if (REPO / path).exists()}


def test_layout_tree_matches_the_repository():
    listed = layout_tree()
    files = repository_files()
    directories = {str(parent) + "/" for path in files for parent in Path(path).parents if str(parent) != "."}
    # A folder listed without children stands for all its files (seed and crash inputs).
    collapsed = {p for p in listed if p.endswith("/") and not any(q != p and q.startswith(p) for q in listed)}
    files_listed = {p for p in listed if not p.endswith("/")}
    assert files_listed | {f for f in files if any(f.startswith(c) for c in collapsed)} == files
    assert {p for p in listed if p.endswith("/")} == {d for d in directories if not any(
        d != c and d.startswith(c) for c in collapsed)}


def test_front_page_tree_lists_every_top_level_folder():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^## Layout\n+```text\n\.\n(.*?)^```", readme, re.M | re.S).group(1)
    listed = set(re.findall(r"^(?:├── |└── )(\S+)/", block, re.M))
    assert listed == {path.split("/")[0] for path in repository_files() if "/" in path}
