"""`lctrain plan`: the real training step simulated in the rehearsal's fake world (meta tensors, a meta:fake
process group, lctrain.rehearse), timed per device.

    simulate.py   one rank of the job (FLOPs by class and dtype, memory-bound bytes, collectives, activation
                  peak from the rehearsal's MemoryWatcher)
    hardware.py   one table of published constants per device
    timemodel.py  step time, tokens/s, MFU and memory per GPU from a simulated rank
    search.py     every valid layout, pruned, cached; the recommendation
    check.py      the pre-reservation memory check (lctrain.preflight)
    cli.py, plot.py, realrun.py (the same step on real gloo ranks), published.py (vs published tables)
"""
