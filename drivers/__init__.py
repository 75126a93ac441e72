"""Protocol drivers. Each module registers one :class:`drivers.base.Driver`."""
