"""What the reports share (`advisor eval`'s and `advisor proxy report`'s): markdown tables, the HTML
page's style, and files replaced whole (a reader never sees half a report)."""

from __future__ import annotations

import os
from pathlib import Path

# Long keys (a harness's session id, a hash) wrap inside their column, and a table still wider than the
# window scrolls inside its own box: the page itself never needs a horizontal scroll at 1280 px
HTML_STYLE = """<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
.wide{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}td:first-child{overflow-wrap:anywhere;min-width:10em;max-width:18em}
th{background:#f3f3f3}.plots img{max-width:48%;margin-right:1%}</style>"""

# one titled table after another, as (title, (header, rows)) pairs
HTML_TABLES = """{% for title, (header, rows) in tables %}<h2>{{ title }}</h2>
{% if rows %}<div class="wide"><table><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for r in rows %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table></div>{% else %}<p>none</p>{% endif %}
{% endfor %}"""


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_whole(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
