"""Documentation links resolve, and the maths is cited only from ``docs/``.

Every reference of the form ``docs/<name>.md`` or ``docs/<name>.md#<anchor>`` in a
text file of the repository (library docstrings, README, docs, tests,
benchmarks), and every relative link to a Markdown file in the README and
``docs/*.md``, must name an existing file and, with an anchor, one of its
headings, slugged as GitHub does. No file may point at the project's notes
outside the repository: ``docs/maths.md`` is the maths reference.
"""
import os
import re
import subprocess
from functools import lru_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Written in pieces so that this file does not contain what it forbids.
FORBIDDEN = {
    "../" + "shared": re.compile(re.escape("../" + "shared")),
    "UFOM" + ".md": re.compile(r"(?<![\w-])" + re.escape("UFOM" + ".md")),
}
DOC_REF = re.compile(r"(?<![\w-])docs/((?:[\w-]+/)*[\w.-]+\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
# What docs/maths.md must hold (issue 11): one section per topic.
MATHS_SECTIONS = (
    "ablo-and-the-estimators-g_k",
    "truncation-laws-and-telescope-weights",
    "the-one-sweep-two-stream-algorithm",
    "costs-and-memory-of-each-schedule",
    "the-two-q-rules",
)
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", "results", ".pytest_cache"}


def repository_files():
    """Relative paths of the tracked files and the untracked ones git does not ignore."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True).stdout.decode()
        paths = [p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist)
        paths = []
        for d, dirs, files in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
            paths += [os.path.relpath(os.path.join(d, f), ROOT) for f in files]
    return sorted(p.replace(os.sep, "/") for p in paths if os.path.isfile(os.path.join(ROOT, p)))


@lru_cache(maxsize=None)
def read_text(rel):
    """The file's text, or ``None`` for a binary or non-UTF-8 file."""
    with open(os.path.join(ROOT, rel), "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_files():
    return [(rel, text) for rel in repository_files() if (text := read_text(rel)) is not None]


def slug(heading):
    """GitHub's anchor for a heading: link text kept, punctuation dropped,
    lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown):
    """The anchors of a Markdown text: its headings' slugs (outside code
    fences; repeats get ``-1``, ``-2``, ...) and explicit ``<a id=...>``."""
    found, counts, fence = set(), {}, None
    for line in markdown.splitlines():
        m = FENCE.match(line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence):
                fence = None
            continue
        if fence is not None:
            continue
        h = HEADING.match(line)
        if h:
            base = slug(h.group(1))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def check_target(path, anchor):
    """A problem with a link to ``path`` (relative to the root) and ``anchor``, or ``None``."""
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        return f"{path}: no such file"
    if anchor and path.endswith(".md") and anchor not in anchors(read_text(path) or ""):
        return f"{path}#{anchor}: no such heading"
    return None


def link_problems(rel, text):
    """Broken docs references and Markdown links in the text of file ``rel``."""
    problems = []
    for m in DOC_REF.finditer(text):
        problem = check_target("docs/" + m.group(1), m.group(2))
        if problem:
            problems.append(f"{rel}: {m.group(0)} -> {problem}")
    if rel.endswith(".md"):
        for target in MD_LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, mailto:
                continue
            path, _, anchor = target.partition("#")
            if path and not path.endswith(".md"):
                continue
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
            problem = check_target(resolved.replace(os.sep, "/"), anchor)
            if problem:
                problems.append(f"{rel}: ({target}) -> {problem}")
    return problems


def forbidden_references(rel, text):
    return [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {name}"
            for name, pattern in FORBIDDEN.items() for m in pattern.finditer(text)]


def test_slug_matches_github():
    assert slug("ABLO and the estimators G_k") == "ablo-and-the-estimators-g_k"
    assert slug("The paper's counter-example") == "the-papers-counter-example"
    assert slug("Costs and memory of each schedule") == "costs-and-memory-of-each-schedule"
    assert slug("The `q` rule (see [here](x.md))") == "the-q-rule-see-here"
    text = "# Title\n```\n# not a heading\n```\n## Same\n## Same\n    # indented code\n"
    assert anchors(text) == {"title", "same", "same-1"}


def test_checker_reports_broken_links():
    # Split literals: the repository scan must not see these made-up targets.
    bad = ("see `docs/" "maths.md#no-such-section`, `docs/" "missing.md` and "
           "[x](maths.md#nor-this)")
    problems = link_problems("docs/README.md", bad)
    assert len(problems) == 3, problems
    good = "see `docs/" "maths.md#the-two-q-rules` and [x](maths.md#references)"
    assert link_problems("docs/README.md", good) == []
    name = "UFOM" + ".md"
    assert forbidden_references("x.py", f"a\nsee {name}\n") == [f"x.py:2: {name}"]
    assert forbidden_references("x.py", "docs/maths.md") == []


def test_maths_has_the_sections():
    have = anchors(read_text("docs/maths.md"))
    assert set(MATHS_SECTIONS) <= have, sorted(set(MATHS_SECTIONS) - have)


def test_docs_links_resolve():
    files = text_files()
    problems = [p for rel, text in files for p in link_problems(rel, text)]
    assert problems == []
    # The check is not vacuous: the library and the README link to the maths.
    library = "".join(text for rel, text in files if rel.startswith("torch_ufom/"))
    assert DOC_REF.search(library), "no docs/ reference in torch_ufom"
    assert "docs/maths.md" in read_text("README.md")


def test_no_reference_outside_the_repository():
    problems = [p for rel, text in text_files() for p in forbidden_references(rel, text)]
    assert problems == []
