"""lightning-etap: which tasks should train together?

Measure gradient-based task affinities during an ordinary Lightning fit,
train a few sampled task groups for ground-truth multi-task gains, fit the
ETAP ensemble predictor, predict every group's gain and select the best
grouping under a budget.
"""

__version__ = "0.1.0.dev0"
