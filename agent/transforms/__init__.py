"""What runs on committed records and adds events: rule limits (:mod:`.limits`) and anomaly
inference (:mod:`.inference`, running the models of :mod:`.anomaly`), which raise and clear
their alarms by one hysteresis (:mod:`.debounce`)."""
