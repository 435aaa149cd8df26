"""A small document model rendered twice: Markdown (figures as relative links, for a
repository) and self-contained HTML (figures embedded as base64, so it can be mailed)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Document:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def notice(self, text: str) -> None:
        self.blocks.append(("notice", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", items))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("image", path, alt))


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, base: Path) -> str:
    """Markdown with images linked relative to `base` (the report's folder)."""
    out = [f"# {doc.title}", ""]
    for kind, *args in doc.blocks:
        if kind == "heading":
            out += [f"{'#' * args[0]} {args[1]}", ""]
        elif kind == "paragraph":
            out += [args[0], ""]
        elif kind == "notice":
            out += [f"> **{args[0]}**", ""]
        elif kind == "bullets":
            out += [f"- {item}" for item in args[0]] + [""]
        elif kind == "table":
            header, rows = args
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "image":
            path, alt = args
            out += [f"![{alt}]({Path(path).relative_to(base).as_posix()})", ""]
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
.notice { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.6em 1em;
          font-weight: bold; }
img { max-width: 100%; margin: 0.5em 0; }
"""


def to_html(doc: Document) -> str:
    """One HTML file with every figure inlined."""
    e = html.escape
    body = [f"<h1>{e(doc.title)}</h1>"]
    for kind, *args in doc.blocks:
        if kind == "heading":
            body.append(f"<h{args[0]}>{e(args[1])}</h{args[0]}>")
        elif kind == "paragraph":
            body.append(f"<p>{e(args[0])}</p>")
        elif kind == "notice":
            body.append(f'<p class="notice">{e(args[0])}</p>')
        elif kind == "bullets":
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in args[0]) + "</ul>")
        elif kind == "table":
            header, rows = args
            head = "".join(f"<th>{e(str(h))}</th>" for h in header)
            cells = "".join(
                "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "image":
            path, alt = args
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            body.append(f'<img alt="{e(alt)}" src="data:image/png;base64,{data}">')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(doc.title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
