"""Task affinity measured during an ordinary Lightning fit.

:class:`AffinityCallback` scores, at every measured step, how much each task's
update to the shared parameters would lower every other task's loss (ETAP,
paper eqs. 5-7, or TAG's lookahead), and :class:`AffinityResult` holds the
labelled, time-averaged matrix; :class:`AffinityDashboard` logs its curves
and final heatmap to the Trainer's loggers. The numerical core lives in
:mod:`lightning_etap.affinity.scores` as plain functions over tensors.
"""

from lightning_etap.affinity.callback import AffinityCallback
from lightning_etap.affinity.dashboard import AffinityDashboard, plot_affinity_heatmap
from lightning_etap.affinity.result import AffinityResult

__all__ = ["AffinityCallback", "AffinityDashboard", "AffinityResult", "plot_affinity_heatmap"]
