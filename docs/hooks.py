"""MkDocs hook: the option reference is generated from the option declarations, never written by hand.

``docs/options.md`` holds the marker ``<!-- options: NAME -->``; each is replaced at build time by
a table of the declared options of ``lightning_batch.plugin.options.BatchSizeOptions`` (``plugin``),
``lightning_batch.config.RunConfig``'s own (``run``) or ``lightning_batch.tune.space.TuneConfig``
(``study``): name, flag, default and help, from the one declaration each; an option declared
``prepares_data`` says that it is part of the data cache's key.
"""

from __future__ import annotations

import re
from typing import Any


def _tables(which: str) -> str:
    from lightning_batch.config import RunConfig
    from lightning_batch.plugin.checks import FLAG
    from lightning_batch.plugin.options import BatchSizeOptions, default_of, option_fields
    from lightning_batch.tune.space import TuneConfig

    plugin_names = {f.name for f, _ in option_fields(BatchSizeOptions)}
    declared = {
        "plugin": option_fields(BatchSizeOptions),
        "run": [(f, i) for f, i in option_fields(RunConfig) if f.name not in plugin_names],
        "study": option_fields(TuneConfig),
    }[which]
    groups: dict[str, list[str]] = {}
    for f, info in declared:
        default = default_of(f)
        shown = (
            "unset"
            if default is None
            else (" ".join(map(str, default)) or "none")
            if isinstance(default, (list, tuple))
            else str(default)
        )
        flag = f"`{info.flag or FLAG.name(f.name)}`" if info.cli or f.name == "space" else "(no flag)"
        names = info.names()
        values = f" ({'&#124;'.join(names)})" if names else ""
        # The options the data cache is keyed by, so a reader sees which ones prepare the tables again.
        keyed = " *(changes the prepared data: part of the data cache's key)*" if info.prepares_data else ""
        row = f"| `{f.name}` | {flag} | `{shown}` | {info.help.replace('|', '&#124;')}{values}{keyed} |"
        groups.setdefault(info.group, []).append(row)
    out = []
    for group, rows in groups.items():
        if which != "plugin":
            out.append(f"\n**{group}**\n")
        out.append("| option (keyword, YAML key) | flag | default | what it does |\n|---|---|---|---|")
        out.extend(rows)
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return re.sub(r"<!-- options: (\w+) -->", lambda m: _tables(m.group(1)), markdown)
