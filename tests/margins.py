"""The margin of every wall-clock upper bound in the tests.

Tests prove that a mechanism fires (a timeout, an expiry, a failure detector) and that it does not fire early,
never how fast anything runs (speed is for benchmarks). A lower bound follows from causality and needs no
margin: nothing can fail a request before its timeout has passed since the request was sent. An upper bound
is what the configuration promises plus `STALL_S`: long enough for a loaded 2-core CI machine (other test
runs, model loads, gloo ranks) to hold up a process, far shorter than "never".
"""

STALL_S = 5.0
