"""Keep the rendered book free of scripts from other hosts.

Jupyter Book always loads sphinx-thebe, which writes an inline script naming thebe's CDN URL
(used only by the "live code" launch button, which this book disables). This extension drops
thebe's scripts from every page, so the built HTML references no script or style on another
host; MathJax is served from the book's own static files (see _config.yml).
"""

from __future__ import annotations


def _is_thebe(script) -> bool:
    filename = getattr(script, "filename", None) or ""
    body = (getattr(script, "attributes", None) or {}).get("body", "") or ""
    return "thebe" in filename or "THEBE_JS_URL" in body


def _drop_thebe(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if scripts:
        context["script_files"] = [s for s in scripts if not _is_thebe(s)]
    styles = context.get("css_files")
    if styles:
        context["css_files"] = [s for s in styles if "thebe" not in (getattr(s, "filename", None) or "")]


def setup(app):
    app.connect("html-page-context", _drop_thebe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
