"""A small document model rendered twice: Markdown for terminals and repositories, and one
self-contained HTML file (styles inline, images embedded as data URIs, no external URL).

    doc = Document("convforge report")
    doc.heading("Training")
    doc.text("best validation accuracy **98.3%** (`train/best.pt`)")
    doc.table(["epoch", "val acc"], [[1, "90.1%"]])
    doc.image("train/curves.png", "training curves")
    doc.write(Path("runs/default"))       # report.md and report.html, together

Text may use ``**bold**`` and ```code``` and nothing else of Markdown, so both
renderings say the same thing.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from convforge.files import Staging, together

_INLINE = re.compile(r"\*\*(.+?)\*\*|`(.+?)`")
_NUMBER = re.compile(r"^[-+]?[\d,.]+(e[-+]?\d+)?%?$|^-$|^[-+]?[\d.e+-]+ - [\d.e+-]+$")

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       max-width: 1040px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-top: 12px; border-top: 1px solid #dde2ea; }
h3 { font-size: 16px; margin: 20px 0 6px; }
p, li { max-width: 860px; }
.muted { color: #5b6475; font-size: 13px; }
.summary { background: #f2f6fc; border: 1px solid #b8cbe6; border-radius: 8px;
           padding: 14px 20px; margin: 16px 0; }
.summary dl { display: grid; grid-template-columns: max-content 1fr; gap: 6px 18px; margin: 0; }
.summary dt { font-weight: 600; color: #33415c; }
.summary dd { margin: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13.5px; }
th, td { border: 1px solid #d4dae3; padding: 4px 10px; text-align: left; }
th { background: #f3f5f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
       background: #f3f5f8; padding: 1px 4px; border-radius: 3px; }
pre { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
      background: #f6f8fa; border: 1px solid #e1e5eb; border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; }
img { max-width: 100%; border: 1px solid #e1e5eb; border-radius: 4px; margin: 6px 0 14px; }
details { margin: 8px 0 16px; } summary { cursor: pointer; color: #2454a6; }
nav { font-size: 13px; margin: 6px 0 0; }
nav a { margin-right: 12px; color: #2454a6; text-decoration: none; }
"""


@dataclass
class Document:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def text(self, text: str, muted: bool = False) -> None:
        self.blocks.append(("text", text, muted))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", list(items)))

    def table(self, headers: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", headers, [[_cell(c) for c in row] for row in rows]))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text.rstrip("\n")))

    def details(self, summary: str, text: str) -> None:
        """Preformatted ``text`` folded away under ``summary`` (opens on a click in HTML)."""
        self.blocks.append(("details", summary, text.rstrip("\n")))

    def image(self, path: str, alt: str, width: int | None = None, source=None) -> None:
        """``path`` is relative to the folder the report is written to; ``width``: at most
        this many CSS px wide in HTML (default: the page's width); ``source``: where the
        HTML rendering reads the PNG from, when it is not there yet (a staged file that
        becomes ``<folder>/<path>`` with the report)."""
        self.blocks.append(("image", path, alt, width, source))

    def summary(self, items: list[tuple[str, str]]) -> None:
        self.blocks.append(("summary", list(items)))

    # -- rendering ---------------------------------------------------------------------------

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += [f"{'#' * block[1]} {block[2]}", ""]
            elif kind == "text":
                out += [f"*{block[1]}*" if block[2] else block[1], ""]
            elif kind == "bullets":
                out += [*(f"- {item}" for item in block[1]), ""]
            elif kind == "table":
                headers, rows = block[1], block[2]
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += [
                    "| " + " | ".join(r.replace("|", "\\|") for r in row) + " |" for row in rows
                ]
                out.append("")
            elif kind == "code":
                out += ["```", block[1], "```", ""]
            elif kind == "details":
                out += ["<details>", f"<summary>{block[1]}</summary>", "", "```", block[2], "```",
                        "", "</details>", ""]  # fmt: skip
            elif kind == "image":
                out += [f"![{block[2]}]({block[1]})", ""]
            elif kind == "summary":
                out += [*(f"> **{label}:** {value}  " for label, value in block[1]), ""]
        return "\n".join(out).rstrip("\n") + "\n"

    def html(self, folder: Path) -> str:
        """The page; images are read from ``folder`` and embedded."""
        sections = [(b[2], _anchor(b[2])) for b in self.blocks if b[0] == "heading" and b[1] == 2]
        nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for t, a in sections)
        parts = [f"<h1>{html.escape(self.title)}</h1>", f"<nav>{nav}</nav>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                level, text = block[1], block[2]
                anchor = f' id="{_anchor(text)}"' if level == 2 else ""
                parts.append(f"<h{level}{anchor}>{_inline(text)}</h{level}>")
            elif kind == "text":
                cls = ' class="muted"' if block[2] else ""
                parts.append(f"<p{cls}>{_inline(block[1])}</p>")
            elif kind == "bullets":
                parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in block[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "code":
                parts.append(f"<pre>{html.escape(block[1])}</pre>")
            elif kind == "details":
                parts.append(f"<details><summary>{_inline(block[1])}</summary>"
                             f"<pre>{html.escape(block[2])}</pre></details>")  # fmt: skip
            elif kind == "image":
                png = Path(block[4]) if block[4] else folder / block[1]
                data = base64.b64encode(png.read_bytes()).decode("ascii")
                alt = html.escape(block[2], quote=True)
                size = f' style="max-width: min(100%, {block[3]}px)"' if block[3] else ""
                parts.append(f'<img src="data:image/png;base64,{data}" alt="{alt}"{size}>')
            elif kind == "summary":
                items = "".join(
                    f"<dt>{html.escape(label)}</dt><dd>{_inline(value)}</dd>"
                    for label, value in block[1]
                )
                parts.append(f'<div class="summary"><dl>{items}</dl></div>')
        body = "\n".join(parts)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n"
        )

    def write(
        self, folder: Path, stem: str = "report", staging: Staging | None = None
    ) -> tuple[Path, Path]:
        """``<stem>.md`` and ``<stem>.html`` in ``folder``, published together (with
        ``staging``: staged in it, for the caller to publish)."""
        md, page = folder / f"{stem}.md", folder / f"{stem}.html"
        with together(staging) as group:
            group.file(md).write_text(self.markdown(), encoding="utf-8")
            group.file(page).write_text(self.html(folder), encoding="utf-8")
        return md, page


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def _inline(text: str) -> str:
    """HTML of ``text`` with its ``**bold**`` and ```code``` spans."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        if m.group(1) is not None:
            out.append(f"<strong>{_inline(m.group(1))}</strong>")
        else:
            out.append(f"<code>{html.escape(m.group(2))}</code>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _td(cell: str) -> str:
    """A table cell: numbers right-aligned (so digits line up), words left."""
    cls = ' class="num"' if _NUMBER.match(cell) else ""
    return f"<td{cls}>{_inline(cell)}</td>"


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
