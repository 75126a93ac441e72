"""Where committed records leave the gateway: the MQTT session (``forwarder.py``), which releases a
committed segment only when the broker acknowledged every message made from it, and the payload
encoders (``payload.py``) that make those messages: the stored segment byte for byte (``json``), one
value per name (``flat``), a Sparkplug B edge node (``sparkplug_b``)."""
