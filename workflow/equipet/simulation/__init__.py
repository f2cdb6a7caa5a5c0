"""Scanner, phantom, the embedded Monte Carlo, the GATE macros and backend, GATE's ROOT format."""
