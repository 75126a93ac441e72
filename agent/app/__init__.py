"""The application: the configuration file, the wiring of sources, buffer, transforms and
sinks into one running agent, and its status listener."""
