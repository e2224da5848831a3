"""Renders the chart in ``deploy/helm`` for the tests, with the part of
Helm's template language it uses: ``{{ }}`` with ``-`` trimming; ``if`` /
``else`` / ``end``, ``range`` and ``with``; values ``.Values.x``,
``.Release.Name``, ``.``, string and number literals; pipelines of
``quote``, ``b64enc``, ``toYaml``, ``nindent N``, ``indent N``,
``required MSG``, ``default D`` and ``not``. Anything else raises, so that
the chart cannot drift beyond what is checked. It is not Helm: no
``helm template`` could run where these tests run."""

from __future__ import annotations

import base64
import json
import re
import shlex
from pathlib import Path

import yaml

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class RenderError(Exception):
    pass


def _tokens(text: str):
    """Text and actions, with trimming applied."""
    out, pos = [], 0
    for m in ACTION.finditer(text):
        before = text[pos : m.start()]
        if m.group(1):
            before = before.rstrip()
        out.append(("text", before))
        out.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = text[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(("text", text[pos:]))
    return out


def _parse(tokens, i=0, stop=()):
    """A tree of nodes up to one of ``stop`` (the end of the tokens when
    empty); returns (nodes, index, the word it stopped at)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else"):
            if word not in stop:
                raise RenderError(f"unexpected {{{{ {value} }}}}")
            return nodes, i, word
        if word in ("if", "range", "with"):
            body, i, how = _parse(tokens, i, ("end", "else"))
            other = []
            if how == "else":
                other, i, _ = _parse(tokens, i, ("end",))
            nodes.append((word, value[len(word) :].strip(), body, other))
        else:
            nodes.append(("expr", value))
    if stop:
        raise RenderError("a block without its {{ end }}")
    return nodes, i, None


def _value(term: str, dot, ctx):
    if term == ".":
        return dot
    if term.startswith("."):
        cur = ctx
        for part in term[1:].split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        return cur
    if term.startswith('"'):
        return json.loads(term)
    if re.fullmatch(r"-?[0-9]+", term):
        return int(term)
    raise RenderError(f"unknown term {term!r}")


def _call(words: list[str], piped, dot, ctx):
    name, args = words[0], [_value(w, dot, ctx) for w in words[1:]]
    if piped is not _NONE:
        args.append(piped)
    if name.startswith(".") or name.startswith('"') or name == "." or name[0].isdigit():
        if len(words) != 1 or piped is not _NONE:
            raise RenderError(f"cannot call {name!r}")
        return _value(name, dot, ctx)
    if name == "quote":
        return json.dumps("" if args[0] is None else str(args[0]))
    if name == "b64enc":
        return base64.b64encode(str(args[0]).encode()).decode()
    if name == "toYaml":
        return yaml.safe_dump(args[0], default_flow_style=False, sort_keys=False).rstrip("\n")
    if name in ("nindent", "indent"):
        n, s = args
        pad = " " * n
        body = "\n".join(pad + line for line in str(s).split("\n"))
        return "\n" + body if name == "nindent" else body
    if name == "required":
        msg, v = args
        if v in (None, "", [], {}):
            raise RenderError(f"required: {msg}")
        return v
    if name == "default":
        d, v = args
        return v if v not in (None, "", [], {}) else d
    if name == "not":
        return not _truthy(args[0])
    raise RenderError(f"unknown function {name!r}")


_NONE = object()


def _eval(expr: str, dot, ctx):
    value = _NONE
    for command in expr.split("|"):
        value = _call(shlex.split(command.strip(), posix=False), value, dot, ctx)
    return value


def _truthy(v) -> bool:
    return v not in (None, False, 0, "", [], {})


def _render(nodes, dot, ctx) -> str:
    out = []
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            v = _eval(node[1], dot, ctx)
            out.append("" if v is None else str(v) if not isinstance(v, bool) else str(v).lower())
        else:
            _, expr, body, other = node
            v = _eval(expr, dot, ctx)
            if kind == "if":
                out.append(_render(body if _truthy(v) else other, dot, ctx))
            elif kind == "with":
                out.append(_render(body, v, ctx) if _truthy(v) else _render(other, dot, ctx))
            elif _truthy(v):  # range
                out.append("".join(_render(body, item, ctx) for item in v))
            else:
                out.append(_render(other, dot, ctx))
    return "".join(out)


def render(chart: Path, values: dict, release: str = "workers") -> list[dict]:
    """The chart's documents, parsed, with ``values`` over its defaults."""
    defaults = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    merged = {**defaults, **values}
    ctx = {"Values": merged, "Release": {"Name": release, "Namespace": "default"}}
    docs = []
    for template in sorted((chart / "templates").glob("*.yaml")):
        nodes, _, _ = _parse(_tokens(template.read_text()))
        text = _render(nodes, ctx, ctx)
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs
