"""Layer 2: the scheduler as a jitted state machine (admission, schedule, commit) over a pytree.

It never imports the model: the same transitions drive the real engine and the simulator.
"""
