"""What the agent, its drivers and the simulators share, and nothing else: configuration
field types, the Modbus register codec and the GMP limit tables. Imports none of them."""
