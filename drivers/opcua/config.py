"""The OPC UA driver's configuration: which node a tag reads, how a group is kept
(polled or subscribed), and how the agent reaches and authenticates to one server.

These models are the reference: docs/configuration.md is generated from their field
docstrings (``python -m agent.app.docgen --write``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator

from agent.core.driver import ConnectionBase, GroupSpec, IdentityTags, ProfileBase, TagBase
from cleanroom_common.fields import ConfigPath, Duration, Strict
from drivers.opcua.nodes import NodeRef

ARRAY_SIZE_MAX = 4096
"""Largest array a tag may declare: an expanded array is that many readings per sample."""


class ArraySpec(Strict):
    """How a tag reads a one-dimensional array variable (ValueRank 1), e.g. per-channel counts."""

    mode: Literal["value", "expand"]
    """``expand``: one reading per element, named ``<tag>.0``, ``<tag>.1``…, each with the
    tag's unit, scale, offset and range (limits and models bind to the element's name).
    ``value``: one reading whose value is the whole array, published as a JSON array, as
    the server sent it (no scale, offset or range)."""
    size: int = Field(ge=1, le=ARRAY_SIZE_MAX)
    """Number of elements the variable must have: an array of another length, or with an
    element that is not a number, a boolean or a string, is a bad reading
    (``array_length`` / ``array_element``), counted in the device's errors."""


class Tag(TagBase):
    """An OPC UA variable read as one tag (or, with ``array: {mode: expand}``, one tag per element)."""

    node_id: str = Field(min_length=1)
    """``ns=2;s=BR1.Temperature`` / ``ns=2;i=1001``, ``nsu=urn:…;s=…`` (namespace URI,
    stable across server restarts), or an absolute browse path from Root such as
    ``/Objects/2:Bioreactor/2:pH`` (elements may name their namespace as ``{urn:…}Name``)."""
    array: ArraySpec | None = None
    """The node is an array variable: read it whole (``mode: value``) or as one tag per
    element (``mode: expand``); unset, the node must hold a scalar (an array is then a bad
    reading, ``unsupported_type``)."""
    datatype: str | None = None
    """The node's OPC UA DataType, as discovered: a built-in type name (``Double``, ``Int32``,
    ``String``, ``DateTime``…) or, for a structured or vendor type, its browse name. Recorded
    by ``cleanroom-agent discover opcua`` for people and tools; values are read as the server
    sends them."""
    access: Literal["read", "read_write"] | None = None
    """The node's access level for the agent's session when discovered (``read`` or
    ``read_write``); the agent only reads."""
    unit_code: str | None = None
    """UNECE Rec. 20 common code of ``unit`` (e.g. ``CEL`` for degC), from the node's EngineeringUnits."""

    _element: int | None = PrivateAttr(None)
    """Which element of the array this tag reads, on the tags an ``expand`` array became."""

    @field_validator("node_id")
    @classmethod
    def _parses(cls, value: str) -> str:
        NodeRef.parse(value)
        return value

    @model_validator(mode="after")
    def _array_consistent(self) -> Tag:
        transformed = self.scale != 1.0 or self.offset != 0.0 or self.range is not None
        if self.array is not None and self.array.mode == "value" and transformed:
            raise ValueError(
                "scale, offset and range apply to one number: with array mode 'value' the "
                "reading is the whole array; use mode 'expand' to scale or range each element"
            )
        return self

    @property
    def element(self) -> int | None:
        """The array element this tag reads (an expanded array's tag), else ``None``."""
        return self._element

    def expanded(self) -> list[Tag]:
        """The tags this one stands for: itself, or one per element of an ``expand`` array."""
        if self.array is None or self.array.mode != "expand":
            return [self]
        out: list[Tag] = []
        for i in range(self.array.size):
            tag = self.model_copy(update={"name": f"{self.name}.{i}"})
            tag._element = i
            out.append(tag)
        return out


class Group(GroupSpec):
    """A poll group, read with one Read call per interval or kept by a subscription."""

    mode: Literal["poll", "subscribe"] = "poll"
    """``poll``: one Read service call per interval for all the group's nodes.
    ``subscribe``: monitored items; the server pushes changes, the interval is then only
    the liveness check of the link."""
    sampling_interval: Duration | None = None
    """Subscribe mode: how often the server samples each node; defaults to the group interval."""
    publishing_interval: Duration | None = None
    """Subscribe mode: how often the server sends collected changes; defaults to the sampling interval."""
    queue_size: int | None = Field(default=None, ge=1)
    """Subscribe mode: samples the server keeps per node between publishes (1 = latest only).
    Unset, it is sized so that no change is lost: every sample of one publishing interval plus
    those of a publish late by up to the connection timeout (at most 1000). A server that still
    drops samples says so, counted as ``queue_overflow`` in the device's errors."""
    trigger: Literal["status", "status_value", "status_value_timestamp"] = "status_value"
    """Subscribe mode: what counts as a change (``status_value_timestamp`` reports every
    new sample even when the value repeats)."""
    deadband: Literal["none", "absolute", "percent"] = "none"
    """Subscribe mode: suppress changes smaller than ``deadband_value`` (absolute, or percent of EURange)."""
    deadband_value: float = Field(default=0.0, ge=0.0)
    """Subscribe mode: the deadband size, in engineering units or percent."""

    @model_validator(mode="after")
    def _deadband_consistent(self) -> Group:
        if self.deadband == "none" and self.deadband_value:
            raise ValueError("deadband_value is set but deadband is 'none'")
        return self


class Connection(ConnectionBase):
    """How to reach one OPC UA server, and with which identity."""

    url: str = Field(pattern=r"^opc\.tcp://(\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+)(:\d+)?(/.*)?$")
    """Endpoint URL, e.g. ``opc.tcp://10.0.4.21:4840`` or ``opc.tcp://[fd00::21]:4840/path``."""
    security_policy: Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"] = (
        "Basic256Sha256"
    )
    """Security policy of the secure channel. The default signs and encrypts, and so needs
    ``certificate``, ``private_key`` and a way to check the server (``server_certificate`` or
    ``trust_dir``). ``None`` (no signature, no encryption: anyone on the network can read and
    forge the values) must be written out, belongs on an isolated network only, and is
    logged as a warning at every start and shown by ``status``."""
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    """Message security: ``Sign`` protects integrity, ``SignAndEncrypt`` also confidentiality.
    Must be ``None`` exactly when the policy is ``None``; unset, it follows the policy
    (``None`` for ``None``, else ``SignAndEncrypt``)."""
    certificate: ConfigPath | None = None
    """The agent's application instance certificate (DER or PEM); see ``cleanroom-agent certs create``."""
    private_key: ConfigPath | None = None
    """Private key of ``certificate`` (PEM)."""
    server_certificate: ConfigPath | None = None
    """Pinned server certificate: only a server holding its key can open the channel."""
    trust_dir: ConfigPath | None = None
    """Directory of trusted server or CA certificates; the server's certificate must chain to one."""
    application_uri: str | None = None
    """Application URI announced to the server; defaults to the URI in ``certificate``
    (they must match, servers check it)."""
    username: str | None = None
    """User name for a UserName identity token (anonymous when unset)."""
    password: SecretStr | None = None
    """Password for ``username``; prefer ``password_file`` or ``${ENV}`` expansion over plain text."""
    password_file: ConfigPath | None = None
    """File holding the password for ``username`` (first line), readable only by the agent."""
    keepalive: Duration = 5.0
    """Server liveness probe period: a dead server is detected within about twice this. A
    probe unanswered for this long counts as a dead link, so not much below the server's
    worst response time under load."""
    session_timeout: Duration = 30.0
    """Session lifetime the server keeps without traffic (asked for; the server may revise it)."""
    max_nodes_per_request: int = Field(default=1000, ge=1)
    """Largest number of nodes in one Read or CreateMonitoredItems call (servers cap it)."""

    @model_validator(mode="before")
    @classmethod
    def _mode_follows_policy(cls, data: Any) -> Any:
        """``security_policy: None`` alone is the explicit choice of no security."""
        if isinstance(data, dict) and data.get("security_policy") == "None" and "security_mode" not in data:
            return {**data, "security_mode": "None"}
        return data

    @model_validator(mode="after")
    def _security_consistent(self) -> Connection:
        if (self.security_policy == "None") != (self.security_mode == "None"):
            raise ValueError("security_mode must be 'None' exactly when security_policy is 'None'")
        if self.security_policy != "None":
            if self.certificate is None or self.private_key is None:
                raise ValueError(
                    f"security_policy {self.security_policy} needs certificate and private_key "
                    "(cleanroom-agent certs create makes them); on an isolated network only, "
                    "write security_policy: None to go without"
                )
            if self.server_certificate is None and self.trust_dir is None:
                raise ValueError(
                    "a secured connection needs server_certificate (pinned) or trust_dir: "
                    "an unverified server could feed the agent any data"
                )
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("a password needs a username")
        return self


class Identity(IdentityTags):
    """Which values name an OPC UA instrument: tags of the profile, then the server's BuildInfo.

    Tags are typically the DI model's ``Identification`` variables (SerialNumber,
    SoftwareRevision, Model, Manufacturer); the server's BuildInfo fills the fields no tag names."""

    build_info: bool = True
    """Fill the fields no tag names from the server's BuildInfo: ProductName as the model,
    ManufacturerName as the vendor, SoftwareVersion (and BuildNumber) as the firmware. Turn
    off when the server is a gateway whose BuildInfo describes the gateway software, not the
    instrument behind it."""


class Alarms(Strict):
    """Alarms & Conditions events to subscribe to; each becomes an ``alarm`` event, buffered like readings."""

    sources: list[str] = Field(min_length=1)
    """Objects whose event notifier is subscribed (their EventNotifier has SubscribeToEvents):
    node ids or browse paths as in a tag's ``node_id``, e.g. the device object, or
    ``i=2253`` for the Server object, which on most servers reports every alarm."""
    warning_from: int = Field(default=400, ge=1, le=1000)
    """Lowest OPC UA severity (1–1000) published with severity ``warning``; below it ``info``."""
    alarm_from: int = Field(default=700, ge=1, le=1000)
    """Lowest OPC UA severity (1–1000) published with severity ``alarm``. The defaults follow
    the bands of OPC 10000-9 (Medium 401–600, Medium High 601–800, High 801–1000), with
    601–699 kept at ``warning``."""
    refresh: bool = True
    """After every (re)connect, ask the server for the conditions still active or
    unacknowledged (ConditionRefresh), so alarms raised while the link was down are not
    missed; a server without ConditionRefresh is logged once and counted
    (``condition_refresh_failed``)."""
    queue_size: int = Field(default=1000, ge=1, le=100_000)
    """Events the server keeps per source between two publishes (the oldest go first)."""
    publishing_interval: Duration = 1.0
    """How often the server sends collected events (the alarm latency)."""

    @field_validator("sources")
    @classmethod
    def _sources_parse(cls, value: list[str]) -> list[str]:
        for text in value:
            NodeRef.parse(text)
        if len(set(value)) != len(value):
            raise ValueError("an alarm source is listed twice")
        return value

    @model_validator(mode="after")
    def _bands_ordered(self) -> Alarms:
        if self.warning_from > self.alarm_from:
            raise ValueError("warning_from must not be above alarm_from")
        return self


class Profile(ProfileBase):
    """An OPC UA device profile: the generic profile with the OPC UA identity, alarms and arrays."""

    identity: Identity | None = None
    """Tags whose values identify the device, and whether the server's BuildInfo fills the
    rest (see :class:`Identity`); without it the BuildInfo alone identifies the device."""
    alarms: Alarms | None = None
    """Alarms & Conditions events to subscribe to (see :class:`Alarms`); none when unset."""

    @model_validator(mode="after")
    def _expand_arrays(self) -> Profile:
        """An ``expand`` array becomes its element tags here, so groups, limits, models and
        payloads see ordinary tags named ``<tag>.<i>``."""
        if not any(isinstance(t, Tag) and t.array is not None for t in self.tags):
            return self
        expanded = [e for t in self.tags for e in (t.expanded() if isinstance(t, Tag) else [t])]
        twice = sorted(n for n, k in Counter(t.name for t in expanded).items() if k > 1)
        if twice:
            raise ValueError(
                f"tag {twice[0]!r} is defined twice (an expanded array names its elements <tag>.<i>)"
            )
        self.tags[:] = expanded
        return self
