"""What turns drivers into records: the scheduler that polls (or subscribes to) devices and
submits every result, good or bad, to the buffer."""
