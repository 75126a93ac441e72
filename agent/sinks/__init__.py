"""Where committed records leave the gateway: the MQTT session and its payload encoders."""
