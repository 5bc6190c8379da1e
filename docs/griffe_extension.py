"""Griffe extension for the API reference: the docstrings as Python's ``help()`` shows them.

- Sphinx roles (``:class:`~pkg.mod.Name```, ``:func:`name```, ``:mod:`pkg.mod```, ``:data:``,
  ``:attr:``, ``:meth:``) become code spans: the docstrings are written for ``help()`` and IDEs,
  which read the roles; the site shows the name they point at.
- A class whose docstring and ``__init__`` signature are generated at import time from the option
  declarations (``DynamicBatchSize``) is documented from the imported class, not from its source.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|mod|data|attr|meth|exc|obj):`~?([^`]+)`")
GENERATED = ("lightning_batch.plugin.callback.DynamicBatchSize",)
KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    shown = target.rsplit(".", 1)[-1] if match.group(0).split("`")[1].startswith("~") else target
    return f"`{shown}`"


class DocstringsAsHelpShowsThem(griffe.Extension):
    def on_class_members(self, *, node: Any, cls: griffe.Class, agent: Any, **kwargs: Any) -> None:
        if cls.path in GENERATED:
            module, _, name = cls.path.rpartition(".")
            runtime = getattr(importlib.import_module(module), name)
            cls.docstring = griffe.Docstring(inspect.getdoc(runtime) or "", parent=cls, parser="google")
            init = cls.members.get("__init__")
            if isinstance(init, griffe.Function):
                init.parameters = griffe.Parameters(
                    *(
                        griffe.Parameter(
                            p.name,
                            annotation=str(p.annotation)
                            if p.annotation is not inspect.Parameter.empty
                            else None,
                            kind=KINDS[p.kind],
                            default=repr(p.default) if p.default is not inspect.Parameter.empty else None,
                        )
                        for p in inspect.signature(runtime.__init__).parameters.values()
                    )
                )
            self.on_instance(node=node, obj=cls, agent=agent)

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_role, obj.docstring.value)
