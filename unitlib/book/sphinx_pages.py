"""A Sphinx extension of the book's build (listed in ``_config.yml``): every page carries each script once.

sphinx-thebe adds its configuration as an inline script (``const THEBE_JS_URL = ...``); with Jupyter Book 1 and
Sphinx 7.4 it reaches every page twice, and the second copy throws "Identifier 'THEBE_JS_URL' has already been
declared" in the browser (Sphinx lists an inline script once with the file name None and once with ""). Scripts
the page lists twice (same file or none, same inline body, same attributes) are kept once.
"""

from __future__ import annotations

from typing import Any


def _key(script: Any) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    return str(getattr(script, "filename", script) or ""), tuple(sorted((k, str(v)) for k, v in attributes.items()))


def unique_scripts(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    """``html-page-context`` hook: drop the repeated entries of the page's ``script_files``."""
    del app, pagename, templatename, doctree
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app: Any) -> dict[str, Any]:
    app.connect("html-page-context", unique_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
