"""The repository documents itself: no file points at documents outside it, every relative link in the Markdown
resolves, and the README and docs/README.md link every page of docs/."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import ROOT

# assembled from pieces, so that this file does not match itself
OUTSIDE = re.compile("|".join([re.escape("../" + "shared"), re.escape("DESIGN" + ".md"), "DESIGN" + r"\s*§"]).encode())
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SKIP_DIRS = {".git", ".venv", "outputs", "wandb", "build", "__pycache__", ".pytest_cache"}


def repository_files() -> list[Path]:
    """Tracked files plus new ones git does not ignore (so a pointer is caught before it is committed)."""
    try:
        listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                 capture_output=True, check=True).stdout.decode()
        files = [ROOT / name for name in listing.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        files = [p for p in ROOT.rglob("*") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]
    return sorted(p for p in files if p.is_file())


def outside_pointers(files: list[Path]) -> list[str]:
    """``path:line: text`` of every line that points at a document outside the repository."""
    hits = []
    for path in files:
        data = path.read_bytes()
        lines = sorted({data.count(b"\n", 0, match.start()) + 1 for match in OUTSIDE.finditer(data)})
        for line in lines:
            text = data.splitlines()[line - 1].decode("utf-8", "replace").strip()
            hits.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}: {text[:120]}")
    return hits


def markdown_files() -> list[Path]:
    return [p for p in repository_files() if p.suffix == ".md" and p.is_relative_to(ROOT)]


def local_links(markdown: Path, anchors: bool = False) -> list[str]:
    """Relative link targets of a Markdown file (no URLs, no in-page anchors), without their ``#anchor`` unless
    ``anchors``."""
    targets = []
    for target in LINK.findall(markdown.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target if anchors else target.split("#", 1)[0])
    return targets


def heading_anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", markdown.read_text(), flags=re.M | re.S)  # no "# comments" in code blocks
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+\s+(.*)$", text, re.M)}


def test_no_file_points_outside_the_repository():
    hits = outside_pointers(repository_files())
    assert not hits, "files point at documents outside the repository (link docs/ instead):\n" + "\n".join(hits)


def test_the_pointer_check_finds_a_planted_pointer(tmp_path):
    clean, dirty = tmp_path / "clean.py", tmp_path / "dirty.py"
    clean.write_text('"""See docs/method.md."""\n')
    dirty.write_text("x = 1\n# the spec: " + "DESIGN" + " §5\nsee " + "../" + "shared/notes\n")
    hits = outside_pointers([clean, dirty])
    assert [h.split(": ", 1)[0] for h in hits] == [f"{dirty}:2", f"{dirty}:3"]


def test_markdown_links_resolve():
    broken = [f"{md.relative_to(ROOT)}: {target}" for md in markdown_files() for target in local_links(md)
              if not (md.parent / target).exists()]
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_markdown_anchors_name_a_heading():
    broken = []
    for md in markdown_files():
        for target in local_links(md, anchors=True):
            path, _, anchor = target.partition("#")
            if anchor and path.endswith(".md") and anchor not in heading_anchors(md.parent / path):
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)


def test_heading_anchors_follow_github():
    assert {"evaluation-python--m-anyflowevaluate", "on-policy-settings-on-the-toy"} <= heading_anchors(
        ROOT / "docs" / "toy.md")


def test_readme_and_index_link_every_docs_page():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert {"method.md", "network.md", "module.md", "checkpoints.md", "toy.md"} <= pages
    readme = {Path(t).name for t in local_links(ROOT / "README.md") if t.startswith("docs/")}
    index = {Path(t).name for t in local_links(ROOT / "docs" / "README.md")}
    assert pages <= readme, f"README.md does not link {sorted(pages - readme)}"
    assert pages <= index, f"docs/README.md does not link {sorted(pages - index)}"
