"""Review by exception: the report a quality reviewer reads for one batch (``cleanroom-agent report
batch ID``), built offline from a buffer file or a broker capture.

``collect`` reads the records (read-only), ``exceptions`` turns those of the batch into typed
findings, ``layout`` gives each section its people's form, and ``render_json``, ``render_html`` and
``render_pdf`` write it; ``plots`` (matplotlib, the ``report`` extra) draws the excursions. Nothing
here runs inside the agent (an import-linter contract).
"""
