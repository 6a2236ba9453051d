"""The report's two renderings: the same content, and an HTML page that needs nothing else."""

import base64
import re

from PIL import Image

from convforge.pipeline.document import Document

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?!data:|#)|url\(|@import|https?://""")


def _doc(tmp_path) -> Document:
    Image.new("RGB", (4, 3), "red").save(tmp_path / "plot.png")
    doc = Document("a <report>")
    doc.summary([("Accuracy", "**98%** on `val`")])
    doc.heading("Data & more")
    doc.text("see <script>alert(1)</script> | and **bold**")
    doc.table(["file", "p50 ms"], [["`m.onnx`", 0.123456], ["a|b", None]])
    doc.image("plot.png", "a plot")
    doc.details("the log", "line 1\nline <2>")
    doc.bullets(["one", "two"])
    doc.code("convforge serve m.onnx")
    return doc


def test_html_is_self_contained(tmp_path):
    page = _doc(tmp_path).html(tmp_path)
    assert not EXTERNAL.search(page)
    data = base64.b64encode((tmp_path / "plot.png").read_bytes()).decode()
    assert f'src="data:image/png;base64,{data}"' in page
    assert "<style>" in page and "<link" not in page and "<script" not in page


def test_html_escapes_text_and_renders_spans(tmp_path):
    page = _doc(tmp_path).html(tmp_path)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<strong>98%</strong> on <code>val</code>" in page
    assert "<title>a &lt;report&gt;</title>" in page
    assert '<h2 id="data-more">Data &amp; more</h2>' in page and 'href="#data-more"' in page
    assert '<td class="num">0.123</td>' in page and "<td><code>m.onnx</code></td>" in page
    assert "<details><summary>the log</summary><pre>line 1\nline &lt;2&gt;</pre>" in page


def test_markdown_carries_the_same_content(tmp_path):
    md = _doc(tmp_path).markdown()
    assert md.startswith("# a <report>\n")
    assert "> **Accuracy:** **98%** on `val`" in md
    assert "| file | p50 ms |\n|---|---|\n| `m.onnx` | 0.123 |\n| a\\|b |  |" in md
    assert "![a plot](plot.png)" in md and "- one\n- two" in md
    assert "```\nconvforge serve m.onnx\n```" in md


def test_write_puts_both_files_in_the_folder(tmp_path):
    md, page = _doc(tmp_path).write(tmp_path)
    assert md.read_text().startswith("# a <report>")
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_a_failed_rendering_writes_neither_file(tmp_path, monkeypatch):
    """report.md and report.html appear together: when the HTML cannot be made, the
    Markdown of this run is not left beside the previous run's HTML."""
    import pytest

    doc = _doc(tmp_path)
    (tmp_path / "report.md").write_text("previous md")
    (tmp_path / "report.html").write_text("previous html")
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())

    def broken(self, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Document, "html", broken)
    with pytest.raises(OSError):
        doc.write(tmp_path)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before
