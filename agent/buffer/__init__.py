"""The one durable stage: readings and events are committed here before anything else sees
them, and released only when the broker acknowledged them."""
