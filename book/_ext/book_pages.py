"""What a reader meets on the page: equation numbers per chapter, wide math that scrolls, and the
execution report generated from the committed notebooks.

* **Equation numbers per chapter.** With ``math_numfig = False`` (``_config.yml``) Sphinx numbers
  a page's equations 1, 2, 3, ...; here a chapter ``notebooks/08_grpo`` prefixes them with its
  number: (8.1), (8.2), ... Labels and ``{eq}`` references go through Sphinx's math domain, so
  references show the same numbers. Pages outside ``notebooks/`` keep plain per-page numbers.
* **Wide display math scrolls inside its box** instead of being cut at the column's edge
  (``static/rlbook.css``).
* **``{execution-report}``**: a table, built when the book is built, of every chapter's
  execution time (the sum of its cells' run times, read from the timestamps Jupyter stores in
  each executed cell), its slowest cell and its ``parameters`` cell, and the versions of the
  packages installed in the environment that builds the book. Nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from importlib import metadata
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

_CHAPTER = re.compile(r"^notebooks/(\d+)_")
PACKAGES = ["torch", "transformers", "tokenizers", "reasoning_gym", "numpy", "matplotlib", "POT",
            "jupyter-book", "myst-nb", "Sphinx", "nbval", "papermill"]


# ----------------------------------------------------------------------------- equations
def _number_equations_by_chapter(app, doctree) -> None:
    env = app.env
    m = _CHAPTER.match(env.docname)
    if m is None:
        return
    chapter = int(m.group(1))
    domain = env.get_domain("math")
    for node in doctree.findall(nodes.math_block):
        number = node.get("number")
        if not number or not str(number).isdigit():
            continue
        node["number"] = f"{chapter}.{number}"
        label = node.get("label")
        if label and label in domain.equations:
            domain.equations[label] = (env.docname, node["number"])


# ----------------------------------------------------------------------------- execution report
def _stamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def notebook_timing(nb: dict) -> dict:
    """Seconds per executed code cell (``shell.execute_reply - iopub.execute_input``) of a
    notebook executed by Jupyter, their sum, and the parameters cell's source."""
    times, params = [], ""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        meta = cell.get("metadata", {})
        if "parameters" in meta.get("tags", []) and not params:
            params = "".join(cell.get("source", ""))
        ex = meta.get("execution", {})
        if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            times.append((_stamp(ex["shell.execute_reply"]) - _stamp(ex["iopub.execute_input"])).total_seconds())
    return {"seconds": sum(times), "slowest": max(times, default=0.0), "cells": len(times), "parameters": params}


def _row(cells) -> nodes.row:
    row = nodes.row()
    for c in cells:
        entry = nodes.entry()
        entry += c if isinstance(c, nodes.Node) else nodes.paragraph(text=str(c))
        row += entry
    return row


def _table(headers, rows) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=len(headers))
    table += group
    for _ in headers:
        group += nodes.colspec(colwidth=1)
    head = nodes.thead()
    head += _row(headers)
    body = nodes.tbody()
    for r in rows:
        body += _row(r)
    group += head
    group += body
    return table


class ExecutionReport(SphinxDirective):
    """``{execution-report}``: the execution table of every chapter in ``notebooks/``."""

    has_content = False

    def run(self):
        root = Path(self.env.srcdir)
        out: list[nodes.Node] = []
        rows, details, total = [], [], 0.0
        for path in sorted((root / "notebooks").glob("*.ipynb")):
            self.env.note_dependency(str(path))
            nb = json.loads(path.read_text())
            t = notebook_timing(nb)
            total += t["seconds"]
            title = next(("".join(c["source"]).splitlines()[0].lstrip("# ").strip()
                          for c in nb["cells"] if c["cell_type"] == "markdown"), path.stem)
            rows.append([title, f"{t['seconds']:.0f}", f"{t['slowest']:.0f}", t["cells"]])
            details.append((title, t["parameters"]))
        rows.append(["all chapters", f"{total:.0f}", "", sum(r[3] for r in rows)])
        out.append(nodes.paragraph(text=(
            f"{len(rows) - 1} chapters; execution times are those of the committed outputs (the "
            f"sum of each chapter's cell run times, kernel start-up excluded), in seconds.")))
        out.append(_table(["chapter", "execution (s)", "slowest cell (s)", "code cells"], rows))
        section = nodes.rubric(text="Parameters of each chapter (its defaults, as executed)")
        out.append(section)
        for title, params in details:
            out.append(nodes.paragraph(text=title))
            out.append(nodes.literal_block(params, params, language="python"))
        versions = []
        for name in PACKAGES:
            try:
                versions.append([name, metadata.version(name)])
            except metadata.PackageNotFoundError:
                versions.append([name, "not installed"])
        out.append(nodes.rubric(text="Packages of the environment that built this page"))
        out.append(_table(["package", "version"], versions))
        return out


class BridgeTable(SphinxDirective):
    """``{bridge-table} SECTION``: the rows of ``rlbook_code.bridges.FIELDS`` for one section;
    ``{bridge-table} configs``: which of ``configs/*.yaml`` each bridge can express (or why not);
    ``{bridge-table} example CONFIG``: the TRL keyword arguments and verl overrides of one config."""

    required_arguments = 1
    final_argument_whitespace = True

    def run(self):
        from rlbook_code import bridges, config

        root = Path(self.env.srcdir)
        self.env.note_dependency(str(Path(bridges.__file__)))
        what, _, rest = self.arguments[0].partition(" ") if self.arguments[0].startswith("example") \
            else (self.arguments[0], "", "")
        code = lambda text: nodes.literal(text, text)  # noqa: E731

        def cell(names):
            if not names:
                return nodes.paragraph(text="—")
            p = nodes.paragraph()
            for i, n in enumerate(names):
                if i:
                    p += nodes.Text(", ")
                p += code(n)
            return p

        if what == "configs":
            rows = []
            for path in sorted((root / "configs").glob("*.yaml")):
                self.env.note_dependency(str(path))
                cfg = config.load_config(path)
                out = [code(path.name)]
                for fn in (bridges.trl_grpo_kwargs, bridges.to_verl_overrides):
                    try:
                        fn(cfg)
                        out.append("yes")
                    except bridges.BridgeError as e:
                        out.append(f"no: {e}")
                rows.append(out)
            return [_table(["config", "TRL GRPOTrainer", "verl main_ppo"], rows)]
        if what == "example":
            path = root / "configs" / (rest.strip() or "grpo.yaml")
            self.env.note_dependency(str(path))
            cfg = config.load_config(path)
            kw = bridges.trl_grpo_kwargs(cfg)
            trl_text = "GRPOConfig(\n" + "".join(f"    {k}={v!r},\n" for k, v in kw.items()) + ")"
            verl_text = "python -m verl.trainer.main_ppo \\\n" + " \\\n".join(
                f"    {o}" for o in bridges.to_verl_overrides(cfg, model_path="<model folder>"))
            return [nodes.rubric(text=f"TRL, from configs/{path.name}"),
                    nodes.literal_block(trl_text, trl_text, language="python"),
                    nodes.rubric(text=f"verl, from configs/{path.name}"),
                    nodes.literal_block(verl_text, verl_text, language="bash")]
        rows = [[code(f.rlbook), cell(f.trl), cell(f.verl), f.note] for f in bridges.FIELDS if f.section == what]
        if not rows:
            raise self.error(f"bridge-table: no section {what!r} in rlbook_code.bridges.FIELDS")
        return [_table(["rlbook TrainConfig", "TRL GRPOConfig", "verl (Hydra key)", "note"], rows)]


def _add_static(app) -> None:
    app.config.html_static_path.append(str(Path(__file__).parent / "static"))


def setup(app):
    app.connect("doctree-read", _number_equations_by_chapter)
    app.connect("builder-inited", _add_static)
    app.add_css_file("rlbook.css")
    app.add_directive("execution-report", ExecutionReport)
    app.add_directive("bridge-table", BridgeTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
