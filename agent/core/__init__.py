"""The bottom of the house: records and events, configuration field types, problems, and
the driver contract. Imports nothing else of the agent's, so every other part (and every
driver) can build on it."""
