"""A griffe extension (mkdocs.yml): our docstrings, written for readers of the source, as Markdown.

The docstrings of ``src/`` are prose with Google-style sections here and there, and they use
three reST habits that Markdown would render badly; this rewrites them, for the API reference
only (the source is untouched):

* Sphinx roles, ``:class:`~entityseg.api.EntitySegmenter``` -> a code span of what Sphinx
  would show (``EntitySegmenter``; with ``~`` the last name, ``title <target>`` the title);
* doctest lines (``>>> ...`` and their output) outside a fenced block -> a ``python`` fence
  (Markdown reads ``>>>`` as nested quotes);
* a bullet list right after a line of prose -> a blank line first (Markdown needs one).
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`<]*?)\s*(?:<([^`>]+)>)?`")
SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Returns?|Raises|Yields|Attributes|Examples?|Notes?|"
    r"Warns|Warnings?|Other Parameters|Keyword Arg(?:ument)?s|Receives|Methods|Functions|"
    r"Classes|Modules)\s*:\s*$"
)
BULLET = re.compile(r"^\s*[*-] \S")


def _role(match: re.Match) -> str:
    tilde, text, target = match.groups()
    if target:  # :role:`title <target>`
        return f"`{text}`" if text else f"`{target}`"
    if tilde:
        text = text.rsplit(".", 1)[-1]
    return f"`{text}`"


def to_markdown(text: str) -> str:
    """The docstring ``text`` with roles, doctests and lists made Markdown (see the module)."""
    text = ROLE.sub(_role, text)
    out: list[str] = []
    fenced = doctest = in_section = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
        elif not fenced and SECTION.match(line):
            in_section = True
        if doctest and not stripped:  # a blank line ends the doctest block
            out.append("```")
            doctest = False
        elif not fenced and not doctest and not in_section and stripped.startswith(">>>"):
            if out and out[-1].strip():
                out.append("")
            out.append("```python")
            doctest = True
        elif (
            not fenced
            and not doctest
            and not in_section
            and BULLET.match(line)
            and out
            and out[-1].strip()
            and not BULLET.match(out[-1])
            and not out[-1].startswith((" ", "\t"))  # a continuation of an item
        ):
            out.append("")
        out.append(line)
    if doctest:
        out.append("```")
    return "\n".join(out)


class DocstringMarkdown(griffe.Extension):
    """Rewrites every docstring with :func:`to_markdown` as griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
