"""Where committed records leave the gateway: the MQTT session publishing stored segments unchanged."""
