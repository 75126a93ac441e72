"""Node references: a tag's ``node_id`` as written, and its mapping onto the connected server.

A tag's ``node_id`` is any of ``ns=2;i=…``/``ns=2;s=…`` (index form), ``nsu=URI;s=…``
(namespace URI form) or an absolute browse path such as
``/Objects/2:Bioreactor/2:Temperature.2:CurrentValue`` (OPC 10000-4 A.2 syntax, from the
Root folder), where an element's namespace may also be written as a URI in braces:
``/Objects/{urn:cleanroom-edge:sim:bioreactor}Bioreactor``. Namespace *indices* are
server-assigned and may change when a server restarts with its namespaces registered in
another order; URIs do not. So the driver resolves every URI and browse path to a
concrete NodeId on each connect, and again when a Read answers ``BadNodeIdUnknown``.
A tag that cannot be resolved keeps the reason why, so it becomes a bad reading saying
so while the rest of the device still runs.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.ua_binary import nodeid_to_binary, struct_to_binary
from asyncua.ua.uaerrors import UaError

_URI_ELEMENT = re.compile(r"\{([^{}]+)\}")


class _RefKind(Enum):
    NODE_ID = "node_id"
    NAMESPACE_URI = "nsu"
    BROWSE_PATH = "browse_path"


@dataclass(frozen=True)
class NodeRef:
    """A tag's node id as written, parsed once; :func:`resolve_nodes` maps it onto the
    namespace table of the server currently connected."""

    kind: _RefKind
    text: str
    node_id: ua.NodeId | None = None
    uri: str | None = None

    @classmethod
    def parse(cls, text: str) -> NodeRef:
        """Parse and encode once: what the stack cannot put on the wire (an index beyond
        UInt16, a negative numeric id) is a config error now, not a failing poll later."""
        text = text.strip()
        try:
            if text.startswith("/"):
                struct_to_binary(ua.RelativePath.from_string(_URI_ELEMENT.sub("0:", text)))
                return cls(_RefKind.BROWSE_PATH, text)
            if text.startswith("nsu="):
                uri, sep, rest = text[4:].partition(";")
                if not sep or not uri or rest.startswith(("ns=", "srv=")):
                    raise ValueError("expected nsu=<namespace URI>;<i=, s=, g= or b= identifier>")
                node = ua.NodeId.from_string(rest)
                nodeid_to_binary(node)
                return cls(_RefKind.NAMESPACE_URI, text, node_id=node, uri=uri)
            node = ua.NodeId.from_string(text)
            if isinstance(node, ua.ExpandedNodeId):
                raise ValueError("srv= (a node on another server) is not supported")
            nodeid_to_binary(node)
        except (ValueError, UaError, struct.error, OverflowError, TypeError) as exc:
            # one line: the stack's message repeats the text raw, newlines and all
            reason = " ".join(str(exc).split())
            raise ValueError(f"{text!r} is not a node id ({reason})") from None
        return cls(_RefKind.NODE_ID, text, node_id=node)

    def browse_path(self, namespaces: Sequence[str]) -> ua.RelativePath:
        def index_of(m: re.Match[str]) -> str:
            try:
                return f"{namespaces.index(m.group(1))}:"
            except ValueError:
                raise LookupError(f"namespace {m.group(1)} not on server") from None

        return ua.RelativePath.from_string(_URI_ELEMENT.sub(index_of, self.text))

    def with_index(self, namespaces: Sequence[str]) -> ua.NodeId:
        assert self.node_id is not None
        if self.kind is _RefKind.NODE_ID:
            return self.node_id
        assert self.uri is not None
        try:
            idx = namespaces.index(self.uri)
        except ValueError:
            raise LookupError(f"namespace {self.uri} not on server") from None
        return ua.NodeId(self.node_id.Identifier, ua.Int16(idx), self.node_id.NodeIdType)


async def resolve_nodes(
    client: Client,
    refs: Mapping[str, NodeRef],
    max_nodes_per_request: int,
    on_unresolved: Callable[[str, str], None],
    namespaces: Sequence[str] | None = None,
) -> dict[str, ua.NodeId | str]:
    """Each tag's NodeId on the connected server, or the status saying why it has none
    (``on_unresolved`` hears about each of those); ``namespaces`` is the server's namespace
    table when the caller has read it already."""
    if namespaces is None:
        namespaces = await client.get_namespace_array()
    nodes: dict[str, ua.NodeId | str] = {}
    paths: list[tuple[str, ua.RelativePath]] = []
    for name, ref in refs.items():
        try:
            if ref.kind is _RefKind.BROWSE_PATH:
                paths.append((name, ref.browse_path(namespaces)))
            else:
                nodes[name] = ref.with_index(namespaces)
        except LookupError as exc:
            nodes[name] = "BadNamespaceUnknown"
            on_unresolved(name, str(exc))
    root = ua.NodeId(ua.Int32(ObjectIds.RootFolder))
    for start in range(0, len(paths), max_nodes_per_request):
        chunk = paths[start : start + max_nodes_per_request]
        results = await client.translate_browsepaths(root, [p for _, p in chunk])
        for (name, _), res in zip(chunk, results, strict=True):
            if res.StatusCode.is_good() and res.Targets:
                target = res.Targets[0].TargetId  # an ExpandedNodeId: keep the local part
                nodes[name] = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
            else:
                why = res.StatusCode.name if not res.StatusCode.is_good() else "BadNoMatch"
                nodes[name] = why
                on_unresolved(name, why)
    return nodes
