"""The sections of a MIMIC-CXR report file, split as MIMIC-CXR's own section parser splits them.

MIMIC-CXR's code (`txt/section_parser.py`, used by `create_section_files.py`, which writes the
`findings` and `impression` columns most report-generation papers start from) reads a report
file this way, and so does `findings_section` here:

1. A header is an upper-case name at the start of a line, after the one space that indents
   every line of the release's files, then a colon: `\\n FINDINGS: ` (`[A-Z ()/,-]+`). Text
   before the first header is the preamble; a file without a header is one "full report"
   section. The search for the next header resumes after the end of the header's own line.
2. Names are normalised: a table of spellings ("conclusion" is the impression, "chest, two
   views" the findings, typos such as "impresson"), else the first of impression, findings,
   history, comparison, addendum that the name contains ("findings and impression" is the
   impression), else "findings" when it names a view ("pa and lateral", "portable", ...).
3. Empty findings and impression sections are dropped; a report with neither gets its last
   paragraph (after the last section's first blank line) as "last_paragraph".
4. The findings are the *last* section named "findings", stripped.

Not reproduced: the script's fixed exceptions for about 55 individual studies (spans and
renamed sections for badly formatted reports), which choose the impression, not the findings.
"""
from __future__ import annotations

import re

_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s", re.DOTALL)
_ALIASES = {  # normalised name -> the spellings the release uses for it
    "preamble": ("preamble",),
    "impression": ("impression", "conclusion", "findings and impression", "findings/impression",
                   "findings/ impression", "ndication", "impresson", "imprression",
                   "imoression", "impressoin", "imprssion", "impresion", "imperssion",
                   "mpression", "impession"),
    "findings": ("findings", "chest, two views", "finding", "findins", "findindgs", "findgings",
                 "findngs", "findnings", "finidngs", "reference findings"),
    "comparison": ("comparison", "comparisons", "reference exam", "comparison exam",
                   "comparison film", "comparision", "comparsion", "comparrison",
                   "comparisions"),
    "indication": ("indication", "reason for examination", "reason for exam",
                   "clinical indication", "idication"),
    "examination": ("examination", "exam", "type of examination"),
    "technique": ("technique",),
    "history": ("history", "clinical history", "clinical information", "patient history",
                "pfi"),
    "notification": ("notification",),
    "recommendations": ("recommendation(s)", "recommendations", "recommendation"),
    "addendum": ("addendum",),
    "date": ("date",),
    "comment": ("comment",),
    "wet read": ("wet read", "wetread"),
}
_NORMAL_NAME = {spelling: name for name, spellings in _ALIASES.items() for spelling in spellings}
_MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
_VIEW_NAME = re.compile(
    r"chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|"
    r"two views|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|"
    r"frontal semi-upright|ribs|pa and lat")


def _normal_name(name: str) -> str:
    name = name.lower().strip()
    if name in _NORMAL_NAME:
        return _NORMAL_NAME[name]
    main = next((m for m in _MAIN_SECTIONS if m in name), None)
    if main is not None:
        return main
    return "findings" if _VIEW_NAME.search(name) else name


def split_sections(text: str) -> list[tuple[str, str]]:
    """[(normalised name, text)] of a MIMIC-CXR report file, in order (see module docstring)."""
    header = _HEADER.search(text)
    if header is None:
        sections = [("full report", text)]
    else:
        sections = [("preamble", text[:header.start(1)])]
        while header is not None:
            name, start = header.group(1), header.end()
            line_end = text[start:].find("\n")
            header = _HEADER.search(text, start + max(line_end, 0))
            sections.append((name, text[start:header.start() if header else len(text)]))
    sections = [(_normal_name(name), body) for name, body in sections]
    sections = [(name, body) for name, body in sections
                if name not in ("impression", "findings") or body.strip()]
    names = {name for name, _ in sections}
    if not names & {"impression", "findings"} and "\n \n" in sections[-1][1]:
        name, body = sections[-1]
        first, *rest = body.split("\n \n")
        sections[-1] = (name, first)
        sections.append(("last_paragraph", "\n \n".join(rest)))
    return sections


def section(text: str, name: str) -> str:
    """The last section called `name` (normalised), stripped; "" when the report has none."""
    found = [body for section_name, body in split_sections(text) if section_name == name]
    return found[-1].strip() if found else ""


def findings_section(text: str) -> str:
    """The findings of a MIMIC-CXR report file as MIMIC-CXR's section parser extracts them."""
    return section(text, "findings")
