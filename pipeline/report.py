"""A small run report written as both Markdown and self-contained-enough HTML (images by relative path).

Used by ``varitok demo`` and the evaluation commands::

    report = Report("varitok demo")
    section = report.section("Stage 1: tokenizer")
    section.command("varitok train-tokenizer --config tiny")
    section.figures({"images/s": 12.3, "PSNR (dB)": 21.4})
    section.image("tokenizer/recon.png", "input | reconstruction | granularity map")
    report.write(out_dir)   # out_dir/report.md and out_dir/report.html
"""
from __future__ import annotations

import dataclasses
import html
import os
from pathlib import Path
from typing import Any, Mapping, Sequence


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclasses.dataclass
class _Item:
    kind: str  # "text" | "command" | "table" | "image"
    payload: Any


@dataclasses.dataclass
class Section:
    title: str
    items: list[_Item] = dataclasses.field(default_factory=list)

    def text(self, text: str) -> "Section":
        self.items.append(_Item("text", text))
        return self

    def command(self, command: str) -> "Section":
        self.items.append(_Item("command", command))
        return self

    def figures(self, values: Mapping[str, Any]) -> "Section":
        return self.table(["figure", "value"], [[k, v] for k, v in values.items()])

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> "Section":
        self.items.append(_Item("table", (list(header), [list(r) for r in rows])))
        return self

    def image(self, path: str | os.PathLike, caption: str = "") -> "Section":
        self.items.append(_Item("image", (str(path), caption)))
        return self


class Report:
    def __init__(self, title: str):
        self.title = title
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        section = Section(title)
        self.sections.append(section)
        return section

    def markdown(self, base: Path) -> str:
        lines = [f"# {self.title}", ""]
        for section in self.sections:
            lines += [f"## {section.title}", ""]
            for item in section.items:
                if item.kind == "text":
                    lines += [item.payload, ""]
                elif item.kind == "command":
                    lines += ["```bash", item.payload, "```", ""]
                elif item.kind == "table":
                    header, rows = item.payload
                    lines.append("| " + " | ".join(header) + " |")
                    lines.append("|" + "---|" * len(header))
                    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
                    lines.append("")
                elif item.kind == "image":
                    path, caption = item.payload
                    lines += [f"![{caption}]({_relative(path, base)})", f"*{caption}*" if caption else "", ""]
        return "\n".join(lines)

    def html(self, base: Path) -> str:
        esc = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
               "pre{background:#f4f4f4;padding:8px;overflow-x:auto}img{max-width:100%;image-rendering:pixelated}"
               "figure{margin:1em 0}</style></head><body>", f"<h1>{esc(self.title)}</h1>"]
        for section in self.sections:
            out.append(f"<h2>{esc(section.title)}</h2>")
            for item in section.items:
                if item.kind == "text":
                    out.append(f"<p>{esc(item.payload)}</p>")
                elif item.kind == "command":
                    out.append(f"<pre>{esc(item.payload)}</pre>")
                elif item.kind == "table":
                    header, rows = item.payload
                    out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
                    out += ["<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows]
                    out.append("</table>")
                elif item.kind == "image":
                    path, caption = item.payload
                    out.append(f"<figure><img src='{esc(_relative(path, base))}'>"
                               f"<figcaption>{esc(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, directory: str | os.PathLike, name: str = "report") -> tuple[Path, Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        md_path, html_path = directory / f"{name}.md", directory / f"{name}.html"
        md_path.write_text(self.markdown(directory))
        html_path.write_text(self.html(directory))
        return md_path, html_path


def _relative(path: str, base: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), base.resolve())
    except ValueError:
        return str(path)
