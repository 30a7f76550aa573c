"""The repository stands alone: no file refers to a path outside it."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ../shared (a development folder beside the checkout), absolute paths of a development machine
OUTSIDE = re.compile(r"\.\./shared|/work/|/home/[a-z]|reference/paper\.md|code-anchors\.md")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = []
    for name in names.splitlines():
        path = REPO / name
        if path.suffix in {".png", ".pdf", ".npz", ".pt"} or not path.is_file():
            continue
        files.append(path)
    return files


def test_no_file_refers_outside_the_repository():
    hits = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_cited_docs_exist():
    """Every docs/*.md the package and configs cite is shipped."""
    cited = set()
    for path in tracked_text_files():
        cited |= set(re.findall(r"docs/[\w.-]+\.md", path.read_text(errors="replace")))
    missing = sorted(c for c in cited if not (REPO / c).is_file())
    assert not missing, f"cited but not shipped: {missing}"
