"""The wire contract stays wired: every request field is read by the service, and the
generated code matches proto/ (the install step regenerates it).

"Read" is decided by a small type-flow walk of the service's source (``ast``), not by
grepping for a field's name: a field ``M.f`` counts as read only where ``.f`` (or
``getattr(x, "f")``, or a ``WhichOneof`` result compared with ``"f"``) is taken on an
expression known to be an ``M``; ``HasField("f")`` alone tells presence, not the value, and
reads nothing. Types come from annotations (``pb.M``, ``list[pb.M]``, ``pb.A | pb.B``), flow
through assignments, loops, comprehensions, field access, indexing, ``.items()``/``.values()``
of map fields and ``enumerate``, and into the parameters of the service's own functions from
their call sites. So ``request.name`` in ``GetCollection`` says nothing about
``CreateCollectionRequest.name``, and a ``name=`` keyword or a ``"name"`` string elsewhere
reads nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from braid.v1 import braid_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
SERVICE_SOURCES = [ROOT / "service" / name for name in ("convert.py", "rpcs.py", "handlers.py", "encoding.py")]


def _request_fields(message: Descriptor, seen: set[str]) -> set[tuple[str, str]]:
    """(message, field) for every field reachable from a request message."""
    if message.full_name in seen:
        return set()
    seen.add(message.full_name)
    fields = set()
    for field in message.fields:
        fields.add((message.name, field.name))
        if field.message_type is not None and field.message_type.file is pb.DESCRIPTOR:
            if field.message_type.GetOptions().map_entry:
                value = field.message_type.fields_by_name["value"].message_type
                if value is not None and value.file is pb.DESCRIPTOR:
                    fields |= _request_fields(value, seen)
            else:
                fields |= _request_fields(field.message_type, seen)
    return fields


def request_fields() -> set[tuple[str, str]]:
    seen: set[str] = set()
    fields: set[tuple[str, str]] = set()
    for method in pb.DESCRIPTOR.services_by_name["Braid"].methods:
        fields |= _request_fields(method.input_type, seen)
    return fields


# ------------------------------------------------------------------ the type-flow walk

# A type is a frozenset of these; an empty set is "unknown".
#   ("msg", Descriptor)             a message
#   ("list", Descriptor)            a repeated message field (or list of messages)
#   ("map", Descriptor)             a map field whose values are messages
#   ("oneof", Descriptor, str)      the result of ``m.WhichOneof(name)``
#   ("str", str)                    a string constant (a loop over ("gt", "gte", ...))
#   ("tuple", tuple[Type, ...])     a tuple whose positions have types (enumerate, .items())
Type = frozenset
NONE: Type = frozenset()


def _field_type(field: FieldDescriptor) -> Type:
    message = field.message_type
    if message is None or message.file is not pb.DESCRIPTOR:
        return NONE
    if message.GetOptions().map_entry:
        value = message.fields_by_name["value"].message_type
        return frozenset({("map", value)}) if value is not None and value.file is pb.DESCRIPTOR else NONE
    return frozenset({("list" if field.is_repeated else "msg", message)})


def _messages(t: Type) -> list[Descriptor]:
    return [part[1] for part in t if part[0] == "msg"]


def _elements(t: Type) -> Type:
    """What iterating over or indexing into ``t`` gives."""
    out: set = set()
    for part in t:
        if part[0] in ("list", "map"):
            out.add(("msg", part[1]))
    return frozenset(out)


@dataclass
class _Function:
    node: ast.FunctionDef | ast.AsyncFunctionDef
    params: list[str]  # positional parameters, ``self`` and ``cls`` left out


class FieldReads:
    """Walks every function of ``sources`` until the types bound to parameters stop growing;
    ``read`` holds each (message, field) read."""

    def __init__(self, sources: list[str]) -> None:
        self.read: set[tuple[str, str]] = set()
        self.functions: dict[str, list[_Function]] = {}
        trees = [ast.parse(source) for source in sources]
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    params = [a.arg for a in (*node.args.posonlyargs, *node.args.args) if a.arg not in ("self", "cls")]
                    self.functions.setdefault(node.name, []).append(_Function(node, params))
        # Types bound to a parameter: from its annotation, and from every call site seen.
        self.bound: dict[tuple[int, str], Type] = {}
        for functions in self.functions.values():
            for function in functions:
                arguments = function.node.args
                for arg in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs):
                    if arg.annotation is not None:
                        self._bind_param(function, arg.arg, self._annotation(arg.annotation))
        while True:
            before = (len(self.read), sum(len(t) for t in self.bound.values()))
            for tree in trees:
                for node in tree.body:
                    self._statement(node, {})
            if (len(self.read), sum(len(t) for t in self.bound.values())) == before:
                break

    # -- annotations and parameters

    def _annotation(self, node: ast.expr) -> Type:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pb":
            message = pb.DESCRIPTOR.message_types_by_name.get(node.attr)
            return frozenset({("msg", message)}) if message is not None else NONE
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self._annotation(node.left) | self._annotation(node.right)
        containers = ("list", "Sequence", "Iterable", "Iterator", "tuple")
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in containers:
            inner = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
            return frozenset(("list", message) for message in _messages(self._annotation(inner)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
            return self._annotation(ast.parse(node.value, mode="eval").body)
        return NONE

    def _bind_param(self, function: _Function, name: str, t: Type) -> None:
        key = (id(function.node), name)
        self.bound[key] = self.bound.get(key, NONE) | t

    def _call_into(self, name: str, args: list[ast.expr], keywords: list[ast.keyword], env: dict) -> None:
        for function in self.functions.get(name, []):
            for param, arg in zip(function.params, args, strict=False):
                self._bind_param(function, param, self._expr(arg, env))
            for keyword in keywords:
                if keyword.arg is not None:
                    self._bind_param(function, keyword.arg, self._expr(keyword.value, env))

    # -- statements

    def _statement(self, node: ast.AST, env: dict) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inner = dict(env)
            for function in self.functions.get(node.name, []):
                if function.node is node:
                    for arg in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs):
                        inner[arg.arg] = self.bound.get((id(node), arg.arg), NONE)
            for _ in range(2):  # twice: a binding late in a loop reaches the reads before it
                for child in node.body:
                    self._statement(child, inner)
            for default in (*node.args.defaults, *node.args.kw_defaults):
                if default is not None:
                    self._expr(default, env)
            return
        if isinstance(node, ast.ClassDef):
            for child in node.body:
                self._statement(child, env)
            return
        if isinstance(node, ast.Assign):
            t = self._expr(node.value, env)
            for target in node.targets:
                self._assign(target, t, env)
            return
        if isinstance(node, ast.AnnAssign):
            t = self._annotation(node.annotation)
            if node.value is not None:
                t |= self._expr(node.value, env)
            self._assign(node.target, t, env)
            return
        if isinstance(node, ast.For | ast.AsyncFor):
            self._assign(node.target, self._iterate(node.iter, env), env)
            for child in (*node.body, *node.orelse):
                self._statement(child, env)
            return
        for _, value in ast.iter_fields(node):
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.stmt):
                    self._statement(child, env)
                elif isinstance(child, ast.expr):
                    self._expr(child, env)
                elif isinstance(child, ast.AST):  # withitem, excepthandler, match_case, ...
                    self._statement(child, env)

    def _assign(self, target: ast.expr, t: Type, env: dict) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = env.get(target.id, NONE) | t
        elif isinstance(target, ast.Tuple | ast.List):
            for i, element in enumerate(target.elts):
                part: set = set()
                for option in t:
                    if option[0] == "tuple" and i < len(option[1]):
                        part |= option[1][i]
                self._assign(element, frozenset(part), env)
        else:
            self._expr(target, env)

    def _iterate(self, node: ast.expr, env: dict) -> Type:
        """The type of one element of iterating over ``node``."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "enumerate":
            inner = self._iterate(node.args[0], env) if node.args else NONE
            return frozenset({("tuple", (NONE, inner))})
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args:
            t = self._expr(node.func.value, env)
            if node.func.attr == "items":
                return frozenset({("tuple", (NONE, _elements(t)))})
            if node.func.attr == "values":
                return _elements(t)
        if isinstance(node, ast.Tuple | ast.List):  # a literal: the union of its elements
            out: set = set()
            for element in node.elts:
                if isinstance(element, ast.Starred):
                    out |= _elements(self._expr(element.value, env))
                else:
                    out |= self._expr(element, env)
            return frozenset(out)
        return _elements(self._expr(node, env))

    # -- expressions

    def _mark(self, t: Type, name: str) -> Type:
        """Reading field ``name`` of every message ``t`` may be; the field's type."""
        out: set = set()
        for message in _messages(t):
            field = message.fields_by_name.get(name)
            if field is not None:
                self.read.add((message.name, name))
                out |= _field_type(field)
        return frozenset(out)

    def _expr(self, node: ast.expr, env: dict) -> Type:
        if isinstance(node, ast.Name):
            return env.get(node.id, NONE)
        if isinstance(node, ast.Constant):
            return frozenset({("str", node.value)}) if isinstance(node.value, str) else NONE
        if isinstance(node, ast.Attribute):
            return self._mark(self._expr(node.value, env), node.attr)
        if isinstance(node, ast.Subscript):
            self._expr(node.slice, env)
            return _elements(self._expr(node.value, env))
        if isinstance(node, ast.Tuple):
            return frozenset({("tuple", tuple(self._expr(element, env) for element in node.elts))})
        if isinstance(node, ast.IfExp):
            self._expr(node.test, env)
            return self._expr(node.body, env) | self._expr(node.orelse, env)
        if isinstance(node, ast.BoolOp):
            return frozenset().union(*(self._expr(value, env) for value in node.values))
        if isinstance(node, ast.NamedExpr):
            t = self._expr(node.value, env)
            self._assign(node.target, t, env)
            return t
        if isinstance(node, ast.Compare):
            return self._compare(node, env)
        if isinstance(node, ast.Call):
            return self._call(node, env)
        if isinstance(node, ast.Lambda):
            self._expr(node.body, dict(env))
            return NONE
        if isinstance(node, ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp):
            inner = dict(env)
            for generator in node.generators:
                self._assign(generator.target, self._iterate(generator.iter, inner), inner)
                for condition in generator.ifs:
                    self._expr(condition, inner)
            if isinstance(node, ast.DictComp):
                self._expr(node.key, inner)
                self._expr(node.value, inner)
                return NONE
            element = self._expr(node.elt, inner)
            return frozenset(("list", message) for message in _messages(element))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._expr(child, env)
            elif isinstance(child, ast.AST):
                self._statement(child, env)
        return NONE

    def _compare(self, node: ast.Compare, env: dict) -> Type:
        sides = [self._expr(node.left, env), *(self._expr(c, env) for c in node.comparators)]
        oneofs = [part for side in sides for part in side if part[0] == "oneof"]
        names = {part[1] for side in sides for part in side if part[0] == "str"}
        for element in node.comparators:  # kind in ("a", "b")
            if isinstance(element, ast.Tuple | ast.List | ast.Set):
                names |= {e.value for e in element.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        for _, message, oneof in oneofs:
            members = {field.name for field in message.oneofs_by_name[oneof].fields}
            for name in names & members:
                self.read.add((message.name, name))
        return NONE

    def _call(self, node: ast.Call, env: dict) -> Type:
        func = node.func
        args = [self._expr(arg, env) for arg in node.args]
        for keyword in node.keywords:
            self._expr(keyword.value, env)
        if isinstance(func, ast.Attribute):
            receiver = self._expr(func.value, env)
            strings = {part[1] for t in args[:1] for part in t if part[0] == "str"}
            if func.attr == "HasField":
                return NONE  # a presence test reads no value: the field must be read elsewhere too
            if func.attr == "WhichOneof":
                return frozenset(
                    ("oneof", message, name)
                    for message in _messages(receiver)
                    for name in strings
                    if name in message.oneofs_by_name
                )
            self._call_into(func.attr, node.args, node.keywords, env)
            return NONE
        if isinstance(func, ast.Name):
            if func.id == "getattr" and len(args) >= 2:
                out: set = set()
                for part in args[1]:
                    if part[0] == "str":
                        out |= self._mark(args[0], part[1])
                    elif part[0] == "oneof":  # getattr(msg, msg.WhichOneof(...)): whichever member is set
                        for field in part[1].oneofs_by_name[part[2]].fields:
                            out |= self._mark(frozenset({("msg", part[1])}), field.name)
                return frozenset(out)
            if func.id in ("list", "tuple", "sorted", "reversed") and args:
                return frozenset(part for part in args[0] if part[0] == "list")
            self._call_into(func.id, node.args, node.keywords, env)
        return NONE


def unread_fields(sources: list[str]) -> list[str]:
    reads = FieldReads(sources).read
    return sorted(f"{message}.{name}" for message, name in request_fields() - reads)


def _service_sources() -> Iterator[str]:
    for path in SERVICE_SOURCES:
        yield path.read_text()


def test_every_request_field_is_read_by_the_service():
    assert len(request_fields()) > 60
    unread = unread_fields(list(_service_sources()))
    assert not unread, f"request fields the service never reads: {unread}"


def test_a_field_read_nowhere_else_fails_the_check():
    """The check can fail: take one read out of the real source (another message's field of the
    same name is still read, and the name still appears as a keyword and a string) and the field is
    reported."""
    sources = list(_service_sources())
    rpcs = SERVICE_SOURCES.index(ROOT / "service" / "rpcs.py")
    read = "request.replication_factor)"
    assert read in sources[rpcs]
    sources[rpcs] = sources[rpcs].replace(read, 'dict(replication_factor=0)["replication_factor"])')
    assert unread_fields(sources) == ["CreateCollectionRequest.replication_factor"]
    # A field of the same name read on another message does not count for this one.
    read = "self.catalog.create(request.name,"
    assert read in sources[rpcs]
    sources[rpcs] = sources[rpcs].replace(read, 'self.catalog.create("x",')
    assert "CreateCollectionRequest.name" in unread_fields(sources)
    # A presence test alone is no read.
    convert = SERVICE_SOURCES.index(ROOT / "service" / "convert.py")
    read = "msg.score_threshold if msg.HasField"
    assert read in sources[convert]
    sources[convert] = sources[convert].replace(read, "0.5 if msg.HasField")
    assert "SearchRequest.score_threshold" in unread_fields(sources)


def test_generated_code_matches_the_proto():
    proto = (ROOT / "proto" / "braid" / "v1" / "braid.proto").read_text()
    declared = set(re.findall(r"^message (\w+)", proto, flags=re.MULTILINE))
    assert declared == set(pb.DESCRIPTOR.message_types_by_name)
    rpcs = set(re.findall(r"^\s*rpc (\w+)\(", proto, flags=re.MULTILINE))
    assert rpcs == {m.name for m in pb.DESCRIPTOR.services_by_name["Braid"].methods}
