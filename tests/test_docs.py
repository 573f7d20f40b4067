"""docs/plugins.md stays true: its tested Python blocks run, in order, in one namespace,
so the guide's minimal plugin really passes the contract checker; its entry-point snippet
is the one the example third-party package declares.

A block is tested when the line just before its opening fence is ``<!-- test: run -->``.
The blocks run as one module whose file keeps the guide's line numbers (every other
line blank), so a traceback points at the guide's line, and ``inspect.getsource`` works
for the CLI's help-from-comments.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
IMAGE_PYPROJECT = ROOT / "examples" / "mscn-image-plugin" / "pyproject.toml"

FENCE = re.compile(r"^<!-- test: (?P<tag>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)^```$",
                   re.M | re.S)


def tagged_blocks(tag: str, lang: str) -> list[tuple[int, str]]:
    """``(first line number of the code, code)`` of every block marked ``tag``."""
    text = GUIDE.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group("tag") == tag and m.group("lang") == lang:
            first = text.count("\n", 0, m.start("body")) + 1
            out.append((first, m.group("body")))
    return out


def test_the_guide_marks_its_runnable_blocks():
    blocks = tagged_blocks("run", "python")
    assert len(blocks) >= 3
    assert "class CurvesModality(Modality)" in blocks[0][1]
    assert any("assert_modality(" in code for _, code in blocks)
    n_python = GUIDE.read_text().count("```python")
    assert n_python == len(blocks) + 1  # the one untested block: a test for YOUR plugin


def test_the_guide_code_runs_and_its_plugin_passes_the_checker(tmp_path, monkeypatch):
    blocks = tagged_blocks("run", "python")
    n_lines = GUIDE.read_text().count("\n") + 1
    lines = [""] * n_lines
    for first, code in blocks:
        for i, line in enumerate(code.splitlines()):
            lines[first - 1 + i] = line
    source = tmp_path / "plugins_md.py"  # the guide's code at the guide's line numbers
    source.write_text("\n".join(lines) + "\n")

    module = types.ModuleType("plugins_md")
    module.__file__ = str(source)
    monkeypatch.setitem(sys.modules, "plugins_md", module)
    monkeypatch.chdir(tmp_path)
    for first, code in blocks:
        exec(compile("\n" * (first - 1) + code, str(source), "exec"), module.__dict__)

    ns = module.__dict__
    from mscn_core.testing import check_modality

    assert check_modality(ns["curves"], ns["items"], tmp_dir=tmp_path / "check") == []
    assert [c.name for c in ns["items"]] == ["sine", "ramp"]
    assert ns["opts"].names == ["sine", "ramp"]
    assert (tmp_path / "waves.curves").exists()
    # the options' comments reached the CLI's help
    from mscn_core.cli import field_docs

    assert field_docs(ns["CurvesOptions"])["names"] == "read only the curves with these names " \
        "(default: all)"


def test_the_entry_point_snippet_is_the_example_packages():
    (snippet,) = [code for _, code in tagged_blocks("entry-point", "toml")]
    assert IMAGE_PYPROJECT.exists(), f"{IMAGE_PYPROJECT} is missing"

    def lines(text: str) -> list[str]:
        return [" ".join(x.split()) for x in text.splitlines() if x.strip()]

    want, have = lines(snippet), lines(IMAGE_PYPROJECT.read_text())
    starts = [i for i, x in enumerate(have) if x == want[0]]
    assert any(have[i:i + len(want)] == want for i in starts), (
        f"the guide's entry point\n{snippet}\nis not in {IMAGE_PYPROJECT}")
