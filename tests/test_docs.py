"""What a user reads before running anything: the licence the package declares, the install lines,
markdown that renders, and one figure per benchmark command."""

from __future__ import annotations

import re

from conftest import REPO

FENCE = re.compile(r"^\s*```")


def test_the_declared_licence_ships_as_a_file():
    assert re.search(r'^license = "Apache-2.0"$', (REPO / "pyproject.toml").read_text(), re.M)
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty or Additional Liability." in text


def test_code_fences_open_and_close_on_lines_of_their_own():
    """A fence with text after it on the same line does not close the block (CommonMark): the prose
    after it, and every section down to the next fence, renders as code."""
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        inside = False
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if "```" not in line:
                continue
            assert FENCE.match(line), f"{doc.name}:{n}: ``` inside a line: {line!r}"
            info = line.strip()[3:]
            assert not (inside and info), f"{doc.name}:{n}: a closing fence takes no text: {line!r}"
            inside = not inside
        assert not inside, f"{doc.name}: a code block is never closed"


def test_readme_installs_cpu_torch_from_the_cpu_index():
    """On PyPI, ``torch==X`` for Linux is the CUDA build; the CPU build comes from PyTorch's CPU index.
    The README's pin is the one CI installs."""
    ci_pin = re.search(r"torch==([\d.]+)", (REPO / ".ci" / "run").read_text()).group(1)
    readme = (REPO / "README.md").read_text()
    assert f"pip install torch=={ci_pin} --index-url https://download.pytorch.org/whl/cpu" in readme
    for line in readme.splitlines():
        if "torch==" in line and "--index-url" not in line:
            assert "CPU" not in line, f"a plain PyPI pin called the CPU build: {line!r}"


def test_the_camvid_result_is_the_benchmark_tables_figure_with_its_command():
    guide = (REPO / "docs" / "segmentation.md").read_text()
    section = guide.split("## CamVid results", 1)[1].split("\n## ", 1)[0]
    figure = re.search(r"val mIoU \*\*(0\.\d+)\*\*", section).group(1)
    assert "dptune fit --config configs/camvid.yaml" in section, "the command beside the figure"
    bench = (REPO / "docs" / "benchmarks.md").read_text()
    table = bench.split("## CamVid end to end", 1)[1].split("\n#", 1)[0]
    assert f"**{figure}**" in table


def test_the_readme_is_two_screens_and_links_a_guide_per_topic():
    """A newcomer's README: at most 200 lines, each guide it links exists, and every guide in docs/ is
    linked from it."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)(?:#[\w-]+)?\)", readme))
    on_disk = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert linked == on_disk, (sorted(linked - on_disk), sorted(on_disk - linked))
    for topic in ("segmentation", "depth", "joint", "distributed", "export", "configuration", "benchmarks"):
        assert f"docs/{topic}.md" in linked


def test_links_between_the_docs_reach_a_file_and_a_heading():
    """Every relative markdown link of README.md and docs/*.md names a file that exists and, with a
    #fragment, a heading of that file (GitHub's anchors: lower case, punctuation dropped, spaces to -)."""
    def anchors(path):
        seen, found, inside = {}, set(), False
        for line in path.read_text().splitlines():
            inside ^= bool(FENCE.match(line))
            if line.startswith("#") and not inside:
                slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                n = seen.get(slug, 0)
                seen[slug] = n + 1
                found.add(slug if n == 0 else f"{slug}-{n}")
        return found

    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target, fragment in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path = (doc.parent / target) if target else doc
            assert path.exists(), f"{doc.name}: link to {target}"
            if fragment:
                assert fragment in anchors(path), f"{doc.name}: no heading #{fragment} in {path.name}"
