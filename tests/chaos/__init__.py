"""The chaos suite: real daemons, a real Redis and the mock stand-in under seeded random
faults, then the whole history checked against DESIGN.md's invariants.

plan (the seeded fault schedule) -> farm (the processes) -> inject (each fault) ->
history (what happened) -> checks (what must hold) -> run (one command ties them up).
"""
