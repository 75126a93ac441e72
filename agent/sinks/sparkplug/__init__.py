"""Sparkplug B 3.0: the payload codec (``codec``) and its protobuf schema (``generated``)."""
