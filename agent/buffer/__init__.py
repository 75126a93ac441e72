"""The one durable stage: readings and events are committed here before anything else sees
them, and released only when the broker acknowledged them.

Everything a driver reads or the agent decides is committed here before anyone else sees it:
the forwarder publishes only committed rows and marks them delivered only when the broker
acknowledged them, so a crash, a broker outage or a full disk never turns into silent loss.
Loss that cannot be avoided (the buffer is full) is itself recorded as a ``data_loss`` event,
committed and forwarded like any other record.

Storage is SQLite in WAL mode, one connection, used from one dedicated thread so the event loop
never waits on disk. A row is a *segment* (:mod:`agent.core.chain`): the records of one stream
committed together (blocks of one device, its events, or the audit trail), as the exact payload
that is published, chained to the previous segment of its stream by hash (and signed, with a key).
Rows are never updated: delivery is kept apart (``delivered``), and every removal on purpose is
recorded (``chain_gaps``), so ``verify`` tells a pruned segment from a deleted one.

``config`` is the ``buffer:`` section; ``schema`` the file layout and its migrations; ``rows`` how a
record becomes a row; ``overflow`` what a full buffer gives up and how the loss is accounted;
``store`` the synchronous store (commit, delivery state, retention, inspection) that the CLI uses
directly; ``async_buffer`` the agent's view: seqs at submit, group commit on the buffer thread,
bounded holding while the disk refuses; ``seqs`` the seq window reserved ahead of use; ``lock`` one
agent per buffer; ``integrity`` the SQLite check at start and moving a damaged file aside;
``verify`` the chain check (at start, where it quarantines, and for ``verify --buffer``).
"""
