"""``cleanroom-agent discover opcua URL``: a server's address space browsed into a profile.

Every readable Variable below ``--root`` (the Objects folder by default, without the standard
Server object) becomes a tag: its name from its browse path, its node id in ``nsu=`` form (it
survives a server that registers its namespaces in another order), its unit and range from the
``EngineeringUnits`` and ``EURange`` properties, its data type and access recorded beside them.

Batched, because a server of thousands of nodes must take seconds, not minutes: the tree is
browsed level by level with one Browse call for many nodes (continuation points followed with
BrowseNext), and the attributes and properties of all variables are read with one Read call per
``max_nodes_per_request`` values, capped by the server's own operation limits.

Deterministic, because the file is reviewed and committed: each level is sorted by browse path
before its children are taken, so a node reached by two paths always keeps the same one, names
disambiguated by a suffix always go to the same nodes, and the tags are written in browse-path
order; run again against an unchanged server, only the header's time line differs.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from pydantic import ValidationError

from agent import __version__
from agent.core.discover import Discoverer, Discovery, DiscoveryError, clean_text, tag_names
from agent.core.driver import DeviceError
from drivers.opcua.config import ARRAY_SIZE_MAX, Connection
from drivers.opcua.driver import connect_failure
from drivers.opcua.logs import tame_asyncua_logs
from drivers.opcua.nodes import NodeRef, resolve_nodes
from drivers.opcua.security import ServerCheck, configure_identity

T = TypeVar("T")

UNECE_NAMESPACE = "http://www.opcfoundation.org/UA/units/un/cefact"
"""EUInformation.NamespaceUri of units whose UnitId is a UNECE Rec. 20 common code."""
REFERENCES_PER_NODE = 1000
"""References asked for per node and Browse call; the rest come through continuation points."""
NO_CONTINUATION_RETRIES = 3
"""Times a node refused for want of continuation points is browsed again (in a later batch)."""
_SERVER_OBJECT = ua.NodeId(ua.Int32(ObjectIds.Server))
_HAS_PROPERTY = ua.NodeId(ua.Int32(ObjectIds.HasProperty))
_PROPERTY_TYPE = ua.NodeId(ua.Int32(ObjectIds.PropertyType))
_PROPERTIES = ("EngineeringUnits", "EURange")
_ATTRIBUTES = (
    AttributeIds.DataType,
    AttributeIds.ValueRank,
    AttributeIds.UserAccessLevel,
    AttributeIds.Description,
)
_READ = 1 << ua.AccessLevel.CurrentRead
_WRITE = 1 << ua.AccessLevel.CurrentWrite
_DI_IDENTITY = {
    "SerialNumber": "serial",
    "SoftwareRevision": "firmware",
    "Model": "model",
    "Manufacturer": "vendor",
}
"""DI Identification variable → the profile's identity field it fills."""
_VERSION = re.compile(r"\d+(?:\.\d+)*")
"""A version in what a device reports: its first run of dotted numbers (as ``device.firmware`` reads it)."""
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_LINK_ERRORS = (OSError, TimeoutError, UaError)
_CONNECTION_OPTIONS = (
    "security_policy",
    "security_mode",
    "certificate",
    "private_key",
    "server_certificate",
    "trust_dir",
    "application_uri",
    "username",
    "password_file",
)
"""Connection keys this command takes as options of the same name (``--security-policy``...)."""
_OPTION_OF = {name: "--" + name.replace("_", "-") for name in (*_CONNECTION_OPTIONS, "timeout")}


@dataclass
class _Node:
    """An Object or Variable found below the root."""

    node_id: ua.NodeId
    node_class: ua.NodeClass
    path: tuple[str, ...]
    """Browse names from the root (the root itself not included)."""
    key: tuple[Any, ...]
    """Sort key: per element of the path, its name, namespace URI and node id (in nsu= terms)."""
    is_property: bool = False
    """Reached by HasProperty: a fact about its parent (units, range), never a tag of its own."""
    properties: dict[str, ua.NodeId] = field(default_factory=dict)


@dataclass
class _Found:
    """One readable variable and what was read about it."""

    node: _Node
    node_text: str
    datatype: ua.NodeId
    rank: int | None
    """ValueRank: -1 scalar, >= 1 that many dimensions, 0 one or more, -2 any, -3 scalar or one."""
    array: list[int] | None
    """The array's dimensions (0 where one is not known), None while it is taken as a scalar."""
    access: str
    description: str
    unit: str | None = None
    unit_code: str | None = None
    eu_range: tuple[float, float] | None = None

    def array_size(self) -> int | None:
        """The length the driver's ``array:`` option needs: one dimension of a known length."""
        if self.array is not None and len(self.array) == 1 and 1 <= self.array[0] <= ARRAY_SIZE_MAX:
            return self.array[0]
        return None


@dataclass
class _Options:
    root: NodeRef
    max_depth: int
    max_nodes: int
    include: list[str]
    exclude: list[str]
    include_server: bool


class OpcUaDiscoverer(Discoverer):
    """``discover opcua URL``: browse, read in batches, write a profile."""

    protocol: ClassVar[str] = "opcua"
    help: ClassVar[str] = (
        "browse an OPC UA server's address space into a profile (one tag per readable variable)"
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("url", metavar="URL", help="endpoint, e.g. opc.tcp://10.0.4.21:4840")
        parser.add_argument(
            "--root",
            default="i=85",
            metavar="NODE",
            help="node to browse below: a node id (ns=, nsu=, i=) or a browse path such as "
            "/Objects/2:Bioreactor (default: the Objects folder)",
        )
        parser.add_argument(
            "--include-server",
            action="store_true",
            help="also browse the standard Server object (left out unless --root is inside it)",
        )
        parser.add_argument("--max-depth", type=int, default=10, help="levels below --root (default 10)")
        parser.add_argument(
            "--max-nodes",
            type=int,
            default=20000,
            help="objects and variables visited at most (default 20000)",
        )
        parser.add_argument(
            "--include",
            action="append",
            default=[],
            metavar="PATTERN",
            help="keep only variables whose browse path below --root matches "
            "(glob, e.g. 'Bioreactor/*/CurrentValue'; repeatable)",
        )
        parser.add_argument(
            "--exclude",
            action="append",
            default=[],
            metavar="PATTERN",
            help="leave out nodes whose browse path matches, with everything below them (glob; repeatable)",
        )
        parser.add_argument("--name", help="profile name (default: from the server's product name)")
        parser.add_argument(
            "--device-kind", default="generic", help="device_kind of the profile (default generic)"
        )
        sec = parser.add_argument_group("connection (as the driver's connection: block)")
        fields = Connection.model_fields
        sec.add_argument(
            "--security-policy",
            choices=_literal_choices("security_policy"),
            help=f"default {fields['security_policy'].default}; None only on an isolated network",
        )
        sec.add_argument(
            "--security-mode", choices=_literal_choices("security_mode"), help="default: follows the policy"
        )
        sec.add_argument("--certificate", help="the agent's application certificate (certs create makes one)")
        sec.add_argument("--private-key", help="private key of --certificate (PEM)")
        sec.add_argument("--server-certificate", help="pinned server certificate")
        sec.add_argument("--trust-dir", help="folder of trusted server or CA certificates")
        sec.add_argument("--application-uri", help="application URI (default: the one in --certificate)")
        sec.add_argument("--username", help="user name (anonymous when unset)")
        sec.add_argument(
            "--password-file",
            help="file holding the password (first line); never on the command line, where others can see it",
        )
        sec.add_argument("--timeout", default="5s", help="per request and for connecting (default 5s)")

    async def discover(self, args: argparse.Namespace) -> Discovery:
        options = _options(args)
        conn = _connection(args)
        started = time.monotonic()
        tame_asyncua_logs()
        client = Client(conn.url, timeout=conn.timeout)
        client.name = client.description = "cleanroom-edge discover"
        check: ServerCheck | None = None
        try:
            check = await configure_identity(client, conn)
        except DeviceError as exc:
            raise DiscoveryError(exc.detail or str(exc), bad_input=True) from None
        try:
            await asyncio.wait_for(client.connect(auto_reconnect=False), conn.timeout * 3)
        except Exception as exc:  # whatever the stack raises while connecting is the server's failure
            await _close(client, conn.timeout)
            raise DiscoveryError(connect_failure(exc, conn, check).detail) from None
        try:
            return await _Session(client, conn, options).run(args, started)
        except _LINK_ERRORS as exc:
            raise DiscoveryError(f"{conn.url}: the session failed while browsing: {_describe(exc)}") from None
        finally:
            await _close(client, conn.timeout)


# --------------------------------------------------------------------------- arguments


def _literal_choices(name: str) -> list[str]:
    return list(Connection.model_fields[name].annotation.__args__)  # type: ignore[union-attr]


def _options(args: argparse.Namespace) -> _Options:
    """The browse options, every mistake named before the server is contacted."""
    try:
        root = NodeRef.parse(args.root)
    except ValueError as exc:
        raise DiscoveryError(f"--root: {exc}", bad_input=True) from None
    if args.max_depth < 1:
        raise DiscoveryError(f"--max-depth must be at least 1, not {args.max_depth}", bad_input=True)
    if args.max_nodes < 1:
        raise DiscoveryError(f"--max-nodes must be at least 1, not {args.max_nodes}", bad_input=True)
    for option, patterns in (("--include", args.include), ("--exclude", args.exclude)):
        for pattern in patterns:
            problem = _pattern_problem(pattern)
            if problem:
                raise DiscoveryError(f"{option} {pattern!r}: {problem}", bad_input=True)
    if args.name is not None and not _PROFILE_NAME.match(args.name):
        raise DiscoveryError(f"--name {args.name!r}: letters, digits, '_', '.' and '-' only", bad_input=True)
    return _Options(root, args.max_depth, args.max_nodes, args.include, args.exclude, args.include_server)


def _pattern_problem(pattern: str) -> str | None:
    """Why a glob cannot mean what its writer meant (fnmatch itself accepts anything)."""
    if not pattern:
        return "empty pattern"
    if not pattern.isprintable():
        return "control characters in the pattern"
    if pattern.startswith("/"):
        return "patterns match the browse path below --root, without a leading '/', e.g. 'Bioreactor/*'"
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            while j < len(pattern) and pattern[j] != "]":
                j += 1
            if j >= len(pattern):
                return "'[' is not closed (write [[] for a literal '[')"
            i = j
        i += 1
    return None


def _connection(args: argparse.Namespace) -> Connection:
    """The driver's own Connection model from the options: the same checks as a configuration
    (a secured policy needs a certificate and a way to check the server), said in option names."""
    given = {
        "url": args.url,
        "timeout": args.timeout,
        **{key: value for key in _CONNECTION_OPTIONS if (value := getattr(args, key)) is not None},
    }
    try:
        return Connection.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["loc"] == ("url",):
            message = f"{args.url!r} is not an OPC UA endpoint URL: expected opc.tcp://HOST[:PORT][/PATH]"
        else:
            where = _OPTION_OF.get(str(first["loc"][0]), "") if first["loc"] else ""
            message = (
                f"{where}: {_in_option_names(first['msg'])}" if where else _in_option_names(first["msg"])
            )
        raise DiscoveryError(message, bad_input=True) from None


def _in_option_names(message: str) -> str:
    """A Connection model message, with its key names as this command's options."""
    message = message.removeprefix("Value error, ")
    message = re.sub(
        r"\b(\w+): (\w+)", lambda m: f"{_OPTION_OF[m[1]]} {m[2]}" if m[1] in _OPTION_OF else m[0], message
    )
    return re.sub(r"\b\w+\b", lambda m: _OPTION_OF.get(m[0], m[0]), message)


async def _close(client: Client, within_s: float) -> None:
    """Disconnect within a bounded time, whatever state the link is in."""
    try:
        await asyncio.wait_for(client.disconnect(), within_s)
    except Exception:  # a dead server cannot be told goodbye
        client.disconnect_socket()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UaStatusCodeError):
        return ua.StatusCode(exc.code).name
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------- the session


class _Session:
    """One discovery over one connected client: server facts, browse, reads, the profile."""

    def __init__(self, client: Client, conn: Connection, options: _Options) -> None:
        self.client = client
        self.conn = conn
        self.options = options
        self.requests: Counter[str] = Counter()
        self.namespaces: list[str] = []
        self.read_step = conn.max_nodes_per_request
        self.browse_step = conn.max_nodes_per_request
        self.skipped: Counter[str] = Counter()
        """Why nodes were left out, by reason, for the header."""
        self.truncated = False
        self.datatype_names: dict[ua.NodeId, str] = {}

    async def _call(self, service: str, call: Awaitable[T]) -> T:
        self.requests[service] += 1
        return await call

    async def run(self, args: argparse.Namespace, started: float) -> Discovery:
        facts = await self._server_facts()
        root, root_path = await self._root()
        variables = await self._walk(root)
        found = await self._read_variables(variables)
        if not found:
            raise DiscoveryError(
                f"no readable variable below {self.options.root.text} "
                f"({self._skipped_text() or 'nothing found'})"
            )
        names = tag_names([f.node.path for f in found])
        identity = _identity(names, found)
        device = await self._device(facts, {key: found[names.index(tag)] for key, tag in identity.items()})
        elapsed = time.monotonic() - started
        return self._discovery(args, facts, root_path, found, names, identity, device, elapsed)

    # ------------------------------------------------------------------ server

    async def _server_facts(self) -> dict[str, Any]:
        """Namespace table, identity and operation limits, in one Read."""
        wanted = {
            "namespaces": ObjectIds.Server_NamespaceArray,
            "servers": ObjectIds.Server_ServerArray,
            "product": ObjectIds.Server_ServerStatus_BuildInfo_ProductName,
            "product_uri": ObjectIds.Server_ServerStatus_BuildInfo_ProductUri,
            "vendor": ObjectIds.Server_ServerStatus_BuildInfo_ManufacturerName,
            "version": ObjectIds.Server_ServerStatus_BuildInfo_SoftwareVersion,
            "build": ObjectIds.Server_ServerStatus_BuildInfo_BuildNumber,
            "max_read": ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            "max_browse": ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse,
        }
        values = await self._read([(ua.NodeId(ua.Int32(i)), AttributeIds.Value) for i in wanted.values()])
        facts = {k: _value(dv) for k, dv in zip(wanted, values, strict=True)}
        namespaces = facts["namespaces"]
        if not (isinstance(namespaces, list) and namespaces and all(isinstance(u, str) for u in namespaces)):
            raise DiscoveryError(f"{self.conn.url}: the server did not give its namespace table")
        self.namespaces = namespaces
        for key, attr in (("max_read", "read_step"), ("max_browse", "browse_step")):
            limit = facts[key]
            if isinstance(limit, int) and limit > 0:
                setattr(self, attr, min(getattr(self, attr), limit))
        return facts

    async def _root(self) -> tuple[_Node, str]:
        """The root node, checked: it exists and can have children worth browsing."""
        ref = self.options.root
        resolved = await resolve_nodes(self.client, {"root": ref}, 1, lambda _tag, _why: None)
        node_id = resolved["root"]
        if not isinstance(node_id, ua.NodeId):
            raise DiscoveryError(f"--root {ref.text}: not on this server ({node_id})", bad_input=True)
        node_class, name = await self._read(
            [(node_id, AttributeIds.NodeClass), (node_id, AttributeIds.BrowseName)]
        )
        if not _good(node_class.StatusCode):
            raise DiscoveryError(
                f"--root {ref.text}: not on this server ({_status(node_class.StatusCode)})", bad_input=True
            )
        try:
            klass = ua.NodeClass(_value(node_class))
        except ValueError:
            raise DiscoveryError(f"--root {ref.text}: the server gives no node class for it") from None
        if klass not in (ua.NodeClass.Object, ua.NodeClass.View):
            raise DiscoveryError(
                f"--root {ref.text} is a {klass.name}, not an Object or folder to browse below",
                bad_input=True,
            )
        label = value.Name if isinstance(value := _value(name), ua.QualifiedName) and value.Name else ref.text
        return _Node(node_id, klass, (), ()), f"{ref.text} ({clean_text(str(label))})"

    # ------------------------------------------------------------------ browse

    async def _walk(self, root: _Node) -> list[_Node]:
        """Every Variable below the root within the limits, level by level in browse-path order."""
        opts = self.options
        seen = {root.node_id}
        level = [root]
        variables: list[_Node] = []
        depth = 0
        while level:
            # Variables are browsed for their properties (units, range) even past the limits;
            # the last level's objects too, so the header can say what --max-depth left out.
            browse = [n for n in level if n.node_class is ua.NodeClass.Variable or not self.truncated]
            children = await self._browse([n.node_id for n in browse])
            nxt: list[_Node] = []
            for parent, refs in zip(browse, children, strict=True):
                for ref in refs:
                    child = self._child(parent, ref)
                    if child is None:
                        continue
                    if child.is_property:
                        if parent.node_class is ua.NodeClass.Variable and child.path[-1] in _PROPERTIES:
                            parent.properties.setdefault(child.path[-1], child.node_id)
                        continue
                    if child.node_id in seen:
                        continue
                    if depth >= opts.max_depth:
                        self.skipped[f"nodes below --max-depth {opts.max_depth}"] += 1
                        continue
                    if child.node_id == _SERVER_OBJECT and not opts.include_server:
                        self.skipped["the Server object (--include-server adds it)"] += 1
                        continue
                    if any(fnmatch.fnmatchcase("/".join(child.path), p) for p in opts.exclude):
                        self.skipped["excluded by --exclude (with what is below)"] += 1
                        continue
                    if self.truncated or len(seen) > opts.max_nodes:
                        self.truncated = True
                        continue
                    seen.add(child.node_id)
                    nxt.append(child)
            level = sorted(nxt, key=lambda n: n.key)
            variables += [n for n in level if n.node_class is ua.NodeClass.Variable]
            depth += 1
        return sorted(variables, key=lambda n: n.key)

    def _child(self, parent: _Node, ref: ua.ReferenceDescription) -> _Node | None:
        """The node a reference leads to, on this server, or None (another server's node)."""
        target = ref.NodeId  # asyncua decodes an ExpandedNodeId without its extras as a NodeId
        if getattr(target, "ServerIndex", 0):
            self.skipped["nodes on another server"] += 1
            return None
        index = target.NamespaceIndex
        uri = getattr(target, "NamespaceUri", None)
        if uri:
            if uri not in self.namespaces:
                self.skipped["nodes in a namespace the server does not list"] += 1
                return None
            index = self.namespaces.index(uri)
        node_id = ua.NodeId(target.Identifier, ua.Int16(index), target.NodeIdType)
        name = ref.BrowseName.Name or ""
        name_uri = self._uri(ref.BrowseName.NamespaceIndex)
        is_property = ref.ReferenceTypeId == _HAS_PROPERTY or ref.TypeDefinition == _PROPERTY_TYPE
        return _Node(
            node_id,
            ref.NodeClass,
            (*parent.path, name),
            (*parent.key, (name, name_uri, self._uri(index), _local_text(node_id))),
            is_property,
        )

    def _uri(self, index: int) -> str:
        return self.namespaces[index] if 0 <= index < len(self.namespaces) else str(index)

    async def _browse(self, nodes: Sequence[ua.NodeId]) -> list[list[ua.ReferenceDescription]]:
        """The hierarchical children (Objects and Variables) of each node, in batches, every
        continuation point followed. A node the server cannot browse has no children, counted."""
        refs: list[list[ua.ReferenceDescription]] = [[] for _ in nodes]
        retries: Counter[int] = Counter()
        queue = list(range(len(nodes)))
        while queue:
            batch, queue = queue[: self.browse_step], queue[self.browse_step :]
            params = ua.BrowseParameters()
            params.View = ua.ViewDescription()
            params.RequestedMaxReferencesPerNode = REFERENCES_PER_NODE
            params.NodesToBrowse = [_browse_description(nodes[i]) for i in batch]
            results = await self._call("Browse", self.client.uaclient.browse(params))
            if len(results) != len(batch):
                raise DiscoveryError(f"Browse answered {len(results)} results for {len(batch)} nodes")
            pending: list[tuple[bytes, int]] = []
            for i, res in zip(batch, results, strict=True):
                if (
                    _status(res.StatusCode) == "BadNoContinuationPoints"
                    and retries[i] < NO_CONTINUATION_RETRIES
                ):
                    retries[i] += 1
                    queue.append(i)  # the server was holding too many: browse it again later
                    continue
                if not _good(res.StatusCode):
                    self.skipped[f"not browsable ({_status(res.StatusCode)})"] += 1
                    continue
                refs[i] += res.References
                if res.ContinuationPoint:
                    pending.append((res.ContinuationPoint, i))
            await self._follow(pending, refs)
        return refs

    async def _follow(
        self, pending: list[tuple[bytes, int]], refs: list[list[ua.ReferenceDescription]]
    ) -> None:
        """BrowseNext until every continuation point is used up (all of them in each call);
        one that brings nothing, or a node with more children than --max-nodes, is released."""
        while pending:
            params = ua.BrowseNextParameters()
            params.ReleaseContinuationPoints = False
            params.ContinuationPoints = [cp for cp, _ in pending]
            results = await self._call("BrowseNext", self.client.uaclient.browse_next(params))
            if len(results) != len(pending):
                raise DiscoveryError(f"BrowseNext answered {len(results)} results for {len(pending)} points")
            nxt: list[tuple[bytes, int]] = []
            release: list[bytes] = []
            for (_, i), res in zip(pending, results, strict=True):
                if not _good(res.StatusCode):
                    self.skipped[f"browsed only in part ({_status(res.StatusCode)})"] += 1
                    continue
                refs[i] += res.References
                if not res.ContinuationPoint:
                    continue
                if not res.References or len(refs[i]) > self.options.max_nodes:
                    self.truncated = self.truncated or bool(res.References)
                    release.append(res.ContinuationPoint)
                else:
                    nxt.append((res.ContinuationPoint, i))
            if release:
                params = ua.BrowseNextParameters()
                params.ReleaseContinuationPoints = True
                params.ContinuationPoints = release
                await self._call("BrowseNext", self.client.uaclient.browse_next(params))
            pending = nxt

    # ------------------------------------------------------------------ read

    async def _read(self, items: Sequence[tuple[ua.NodeId, AttributeIds]]) -> list[ua.DataValue]:
        """One DataValue per (node, attribute), read in as few Read calls as the limits allow."""
        out: list[ua.DataValue] = []
        for start in range(0, len(items), self.read_step):
            chunk = items[start : start + self.read_step]
            params = ua.ReadParameters(
                MaxAge=0,
                TimestampsToReturn=ua.TimestampsToReturn.Neither,
                NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=a) for n, a in chunk],
            )
            values = await self._call("Read", self.client.uaclient.read(params))
            if len(values) != len(chunk):
                raise DiscoveryError(f"Read answered {len(values)} values for {len(chunk)} attributes")
            out += values
        return out

    async def _read_variables(self, variables: list[_Node]) -> list[_Found]:
        """The readable variables among those found, with their attributes and properties."""
        opts = self.options
        kept = [
            v
            for v in variables
            if not opts.include or any(fnmatch.fnmatchcase("/".join(v.path), p) for p in opts.include)
        ]
        if len(kept) < len(variables):
            self.skipped["variables not matching --include"] += len(variables) - len(kept)
        values = await self._read([(v.node_id, a) for v in kept for a in _ATTRIBUTES])
        found: list[_Found] = []
        n = len(_ATTRIBUTES)
        for k, node in enumerate(kept):
            datatype, rank, access, description = values[k * n : (k + 1) * n]
            level = _value(access)  # UserAccessLevel: AccessLevel as this session's user may use it
            if not isinstance(level, int):
                self.skipped[f"attributes not readable ({_status(access.StatusCode)})"] += 1
                continue
            if not level & _READ:
                self.skipped["variables not readable (UserAccessLevel)"] += 1
                continue
            text = self._node_text(node.node_id)
            if text is None:
                self.skipped["variables whose node id has no nsu=<uri>;<id> form"] += 1
                continue
            dt = _value(datatype)
            rank_value = _value(rank)
            found.append(
                _Found(
                    node=node,
                    node_text=text,
                    datatype=dt if isinstance(dt, ua.NodeId) else ua.NodeId(ua.Int32(ObjectIds.BaseDataType)),
                    rank=rank_value if isinstance(rank_value, int) else None,
                    array=None,
                    access="read_write" if level & _WRITE else "read",
                    description=clean_text(_text(_value(description))),
                )
            )
        await self._properties(found)
        return found

    def _node_text(self, node_id: ua.NodeId) -> str | None:
        """``nsu=<uri>;<id>``, checked to parse back to the same node (an id that cannot is left out)."""
        if not 0 <= node_id.NamespaceIndex < len(self.namespaces):
            return None
        text = f"nsu={self.namespaces[node_id.NamespaceIndex]};{_local_text(node_id)}"
        try:
            back = NodeRef.parse(text).with_index(self.namespaces)
        except (ValueError, LookupError):
            return None
        return text if back == node_id else None

    async def _properties(self, found: list[_Found]) -> None:
        """Units and ranges from the properties, array shapes, and data type names, in one
        batch of Reads. Whether a variable is an array: its declared ArrayDimensions, else its
        current value (servers often leave ValueRank at Any or OneOrMoreDimensions)."""
        wanted = [
            (f, name, f.node.properties[name], AttributeIds.Value)
            for f in found
            for name in _PROPERTIES
            if name in f.node.properties
        ]
        wanted += [(f, "Value", f.node.node_id, AttributeIds.Value) for f in found if f.rank != -1]
        ranked = [f for f in found if f.rank is not None and f.rank >= 1]
        wanted += [(f, "ArrayDimensions", f.node.node_id, AttributeIds.ArrayDimensions) for f in ranked]
        values = await self._read([(node, attr) for _, _, node, attr in wanted])
        for (f, name, _, _), dv in zip(wanted, values, strict=True):
            value = _value(dv)
            if name == "ArrayDimensions":
                f.array = _dimensions(f.rank, value) or f.array
            elif name == "Value" and isinstance(value, list) and f.array is None:
                shape = dv.Value.Dimensions if dv.Value is not None else None
                f.array = list(shape) if shape and len(shape) > 1 else [len(value)]
            elif name == "EngineeringUnits" and isinstance(value, ua.EUInformation):
                unit = clean_text(_text(value.DisplayName))
                f.unit = unit or None
                if value.NamespaceUri == UNECE_NAMESPACE:
                    f.unit_code = _unece_code(value.UnitId)
            elif name == "EURange" and isinstance(value, ua.Range):
                low, high = value.Low, value.High
                if (
                    isinstance(low, float | int)
                    and isinstance(high, float | int)
                    and math.isfinite(low)
                    and math.isfinite(high)
                    and low <= high
                ):
                    f.eu_range = (float(low), float(high))
        self.datatype_names = await self._datatype_names({f.datatype for f in found})

    async def _datatype_names(self, datatypes: set[ua.NodeId]) -> dict[ua.NodeId, str]:
        """Standard types by their name; a server's own types by their browse name."""
        names: dict[ua.NodeId, str] = {}
        own: list[ua.NodeId] = []
        for dt in sorted(datatypes, key=lambda d: d.to_string()):
            if dt.NamespaceIndex == 0 and isinstance(dt.Identifier, int) and dt.Identifier in ObjectIdNames:
                names[dt] = ObjectIdNames[dt.Identifier]
            else:
                own.append(dt)
        values = await self._read([(dt, AttributeIds.BrowseName) for dt in own])
        for dt, dv in zip(own, values, strict=True):
            value = _value(dv)
            name = clean_text(value.Name or "") if isinstance(value, ua.QualifiedName) else ""
            names[dt] = name or (self._node_text(dt) or dt.to_string())
        return names

    # ------------------------------------------------------------------ the profile

    async def _device(self, facts: dict[str, Any], identity: dict[str, _Found]) -> dict[str, str]:
        """The profile's ``device:``: the model, vendor and firmware this server reports now, read
        the way the driver reads them on connect (the identity variables, else BuildInfo), so the
        profile is checked against the device it was written from. Names are written as literal
        patterns; the firmware as its version exactly (``==2.4.1``), for the engineer to widen."""
        reported = {"model": facts["product"], "vendor": facts["vendor"], "firmware": facts["version"]}
        named = [(key, f.node.node_id) for key, f in identity.items() if key in reported]
        values = await self._read([(node, AttributeIds.Value) for _, node in named])
        for (key, _), dv in zip(named, values, strict=True):
            reported[key] = _value(dv)
        device: dict[str, str] = {}
        for key in ("model", "vendor"):
            text = clean_text(reported[key]) if isinstance(reported[key], str) else ""
            if text:
                device[key] = re.sub(r"([*?\[])", r"[\1]", text)  # a glob that matches only this name
        version = _VERSION.search(reported["firmware"]) if isinstance(reported["firmware"], str) else None
        if version:
            device["firmware"] = f"=={version[0]}"
        return device

    def _discovery(
        self,
        args: argparse.Namespace,
        facts: dict[str, Any],
        root: str,
        found: list[_Found],
        names: list[str],
        identity: dict[str, str],
        device: dict[str, str],
        elapsed: float,
    ) -> Discovery:
        tags = [self._tag(name, f) for name, f in zip(names, found, strict=True)]
        product = clean_text(str(facts["product"] or ""))
        vendor = clean_text(str(facts["vendor"] or ""))
        version = clean_text(str(facts["version"] or ""))
        servers = facts["servers"]
        app_uri = (
            clean_text(servers[0])
            if isinstance(servers, list) and servers and isinstance(servers[0], str)
            else "unknown"
        )
        name = args.name or re.sub(r"[^A-Za-z0-9_.]+", "-", product.lower()).strip("-.") or "opcua-discovered"
        arrays = sum(1 for f in found if f.array is not None)
        what = " ".join(p for p in (vendor, product) if p) or "an OPC UA server"
        profile: dict[str, Any] = {
            "profile": name,
            "protocol": "opcua",
            "device_kind": args.device_kind,
            "description": f"{what}{f' (software {version})' if version else ''}, browsed by "
            "cleanroom-agent discover opcua: review the names, groups and ranges before use.",
            "groups": {"default": {"interval": "1s"}},
        }
        if device:
            profile["device"] = device
        if identity:
            profile["identity"] = identity
        profile["tags"] = tags
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        build = clean_text(str(facts["build"] or ""))
        requests = ", ".join(f"{service} {n}" for service, n in sorted(self.requests.items()))
        header = [
            f"Discovered {now} by cleanroom-agent discover opcua (cleanroom-edge {__version__}).",
            f"Server: ApplicationUri {app_uri}; product {what}"
            + (f" ({clean_text(str(facts['product_uri']))})" if facts["product_uri"] else "")
            + f"; software {version or 'unknown'}{f' build {build}' if build else ''}.",
            "Options: " + self._options_text() + ".",
            f"Found {len(tags)} readable variables as tags ({_count(arrays, 'array')}) below {root}; "
            f"{requests} requests.",
        ]
        if self.skipped:
            header.append(f"Left out: {self._skipped_text()}.")
        if self.truncated:
            header.append(
                f"STOPPED at --max-nodes {self.options.max_nodes}: "
                "the address space is larger than this profile."
            )
        plain = sum(1 for f in found if f.array is not None and f.array_size() is None)
        if plain:
            header.append(
                f"{plain} arrays of more than one dimension or of unknown length are plain tags "
                "(bad readings, unsupported_type, until the driver can read them)."
            )
        if device:
            header.append(
                "device: the model, vendor and firmware the server reports now; widen the firmware "
                "range to the versions this map fits."
            )
        if identity:
            header.append(
                f"identity: the instrument's {', '.join(identity)} from its DI Identification variables."
            )
        header.append(
            "Names come from browse paths; groups and intervals are a starting point: review before use."
        )
        stop = "; STOPPED at --max-nodes" if self.truncated else ""
        summary = (
            f"{len(tags)} tags ({_count(arrays, 'array')}) below {root} in {elapsed:.1f} s, "
            f"{requests} requests{stop}"
        )
        return Discovery(profile=profile, header=header, summary=summary)

    def _tag(self, name: str, f: _Found) -> dict[str, Any]:
        tag: dict[str, Any] = {"name": name, "node_id": f.node_text}
        if f.unit is not None:
            tag["unit"] = f.unit
        notes: list[str] = []
        size = f.array_size()
        if f.array is None:
            if f.eu_range is not None:
                tag["range"] = [_number(x) for x in f.eu_range]
        elif size is not None:
            # The whole array as one reading: no scale or range applies to it; mode expand
            # (one tag per element) is the engineer's choice, EURange then their range.
            tag["array"] = {"mode": "value", "size": size}
            if f.eu_range is not None:
                notes.append(f"EURange [{f.eu_range[0]:g}, {f.eu_range[1]:g}] per element")
        else:
            shape = "".join(f"[{d or ''}]" for d in f.array)
            notes.append(f"array{shape}: the driver reads arrays of one known dimension only")
        tag["datatype"] = self.datatype_names[f.datatype]
        tag["access"] = f.access
        if f.unit_code is not None:
            tag["unit_code"] = f.unit_code
        text = f.description if f.description != f.node.path[-1] else ""  # many servers repeat the name
        description = " ".join(p for p in (text, f"({'; '.join(notes)})" if notes else "") if p)
        if description:
            tag["description"] = description
        return tag

    def _options_text(self) -> str:
        """The options used, without secrets or file paths: what another run needs to repeat it."""
        opts = self.options
        parts = [
            f"URL {self.conn.url}",
            f"--root {opts.root.text}",
            f"--max-depth {opts.max_depth}",
            f"--max-nodes {opts.max_nodes}",
        ]
        parts += [f"--include {p}" for p in opts.include] + [f"--exclude {p}" for p in opts.exclude]
        if opts.include_server:
            parts.append("--include-server")
        parts.append(
            f"--security-policy {self.conn.security_policy} --security-mode {self.conn.security_mode}"
        )
        parts.append("user login" if self.conn.username else "anonymous")
        return ", ".join(clean_text(p) for p in parts)

    def _skipped_text(self) -> str:
        return "; ".join(f"{why}: {n}" for why, n in sorted(self.skipped.items()))


def _browse_description(node: ua.NodeId) -> ua.BrowseDescription:
    desc = ua.BrowseDescription()
    desc.NodeId = node
    desc.BrowseDirection = ua.BrowseDirection.Forward
    desc.ReferenceTypeId = ua.NodeId(ua.Int32(ObjectIds.HierarchicalReferences))
    desc.IncludeSubtypes = True
    desc.NodeClassMask = ua.NodeClass.Object | ua.NodeClass.Variable | ua.NodeClass.View
    desc.ResultMask = ua.BrowseResultMask.All
    return desc


def _local_text(node_id: ua.NodeId) -> str:
    """The identifier part of a node id (``i=…``, ``s=…``, ``g=…``, ``b=…``), without its namespace."""
    return ua.NodeId(node_id.Identifier, ua.Int16(0), node_id.NodeIdType).to_string()


def _identity(names: Sequence[str], found: Sequence[_Found]) -> dict[str, str]:
    """The profile's ``identity:`` from the DI model's Identification variables (OPC 10000-100),
    each field only where exactly one such variable names it."""
    candidates: dict[str, list[str]] = {}
    for name, f in zip(names, found, strict=True):
        path = f.node.path
        if len(path) >= 2 and path[-2] == "Identification" and path[-1] in _DI_IDENTITY:
            candidates.setdefault(_DI_IDENTITY[path[-1]], []).append(name)
    return {key: tags[0] for key in _DI_IDENTITY.values() if len(tags := candidates.get(key, [])) == 1}


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _number(x: float) -> float | int:
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _good(status: ua.StatusCode | None) -> bool:
    return status is None or status.is_good()  # an absent status is Good on the wire


def _status(status: ua.StatusCode | None) -> str:
    return "Good" if status is None else status.name


def _value(dv: ua.DataValue) -> Any:
    return dv.Value.Value if _good(dv.StatusCode) and dv.Value is not None else None


def _text(value: Any) -> str:
    if isinstance(value, ua.LocalizedText):
        return value.Text or ""
    return ""


def _dimensions(rank: Any, dims: Any) -> list[int] | None:
    """The dimensions an array variable declares (ValueRank >= 1 and ArrayDimensions, every
    length known), else None: its value then says whether it is one."""
    if not isinstance(rank, int) or rank < 1 or not isinstance(dims, list) or len(dims) != rank:
        return None
    if all(isinstance(d, int) and d > 0 for d in dims):
        return [int(d) for d in dims]
    return None


def _unece_code(unit_id: Any) -> str | None:
    """The UNECE common code packed into an EUInformation.UnitId (one byte per character)."""
    if not isinstance(unit_id, int) or unit_id <= 0:
        return None
    raw = unit_id.to_bytes(4, "big", signed=False).lstrip(b"\0") if unit_id < 2**32 else b""
    code = raw.decode("ascii", errors="replace")
    return code if raw and code.isalnum() else None
