"""Protocol drivers. Each module registers one :class:`agent.core.driver.Driver`."""
