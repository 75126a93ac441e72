"""What runs on committed records: rule limits and anomaly inference (both add events)."""
