"""Fan-out: a command's independent jobs (a sweep's points, a study's settings, validate's
groups of runs) handed to one executor interface, in-process or on Ray (docs/fanout.md).

Invariants: the driver alone writes results; a job's result is the same whichever executor
ran it; outcomes come back in job order, whatever order the jobs finished in.
"""
