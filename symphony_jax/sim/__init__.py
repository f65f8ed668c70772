"""Layer 4: the cluster simulator — a cost model in place of the forward pass, driving the
same scheduler as the engine. It never imports the model or the engine."""

from symphony_jax.sim.cost_model import (FEATURES, Calibrated, Geometry, Roofline, StepSamples,
                                         features, fit, load_profile, padded_counts,
                                         relative_errors, save_profile)
from symphony_jax.sim.hardware import GPU, GPUS, gpu
