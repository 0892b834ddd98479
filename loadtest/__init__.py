"""Load generation and benchmarks: replaying speech into Parley as live speakers would."""
