"""Fault injection: restarts, pauses, network faults, exhaustion, cancellation, bad input."""
