"""One router per resource: locks, events, health."""
