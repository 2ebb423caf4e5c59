"""Which groups to pay to train: search strategies over the ground-truth store.

Every trained group costs real compute. These strategies decide which
groups to train, one after the other, and what grouping to return:

* :func:`random_search`: random groups, the best grouping made of them (no predictor).
* :func:`random_selection`: the ETAP paper's protocol: random training
  groups, a gain predictor, exact selection over every group.
* :func:`quick_reject_search`: Ayman et al. 2023: a randomized search over
  partitions whose proposals the predictor quick-rejects.
* :func:`mtgnet_search`: MTG-Net's active loop (Song et al. 2022): train the
  group predicted to improve the current best grouping most.
* :func:`active_etap_search`: ours: train the groups of largest expected
  improvement of the selection under the posterior of
  :class:`~lightning_etap.predictors.BayesianETAPPredictor` (or a bootstrap
  ensemble of a predictor without a posterior).

They share one interface: ``strategy(trainer, n_trainings, predictor=...,
budget=..., store=..., seeds=..., executor=..., objective=..., candidates=...,
checkpoints=..., random_state=...) -> SearchResult`` (all keywords after
``n_trainings``; :func:`random_search` takes no predictor). They train through
:func:`~lightning_etap.groundtruth.collect_gains` into a
:class:`~lightning_etap.groundtruth.GainStore`, so a group the store holds is
never trained again and a crashed search, rerun on the same store with the
same arguments, repeats its decisions without training and continues where
it stopped. :class:`OracleTrainer` answers from a measured table instead of
training, for comparing strategies cheaply and exactly
(``benchmarks/active_search.py``).

Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from lightning_etap.groundtruth import GroupGains
    >>> from lightning_etap.groups import all_groups
    >>> from lightning_etap.search import OracleTrainer, random_search, total_test_loss
    >>> masks = all_groups(4, min_size=2)
    >>> losses = np.where(masks, 1.0 - 0.1 * masks.sum(axis=1, keepdims=True), np.nan)
    >>> table = GroupGains(("a", "b", "c", "d"), masks, losses, 1.0 - losses, np.zeros(len(masks), int),
    ...                    {0: np.ones(4)})
    >>> store = os.path.join(tempfile.mkdtemp(), "search.sqlite")
    >>> result = random_search(OracleTrainer(table), 3, budget=2, store=store)
    >>> result.groups, result.n_trainings, round(result.estimated_loss, 3)
    ((('a', 'b', 'c', 'd'),), 3, 2.4)
    >>> round(total_test_loss(result.groups, table), 3)
    2.4
"""

from ._common import OBJECTIVES, SearchResult, SearchStep, total_test_loss
from .active import (
    ANSWERS,
    INITIAL_DESIGNS,
    SEARCH_PRIOR_GRID,
    active_etap_search,
    bootstrap_template,
    has_posterior,
)
from .baselines import random_search, random_selection
from .mtgnet_loop import mtgnet_search, swap_improvements
from .oracle import OracleTrainer, load_table
from .quick_reject import ACCEPT_RULES, QUICK_REJECT_SCHEDULE, quick_reject_probability, quick_reject_search


#: Every strategy by name.
class _Strategies(dict):
    """A name -> strategy mapping whose unknown names are refused with the known ones."""

    def __missing__(self, key):
        raise KeyError(f"no search strategy {key!r}; the strategies are {sorted(self)}")


STRATEGIES = _Strategies({
    "random_search": random_search,
    "random_selection": random_selection,
    "quick_reject_search": quick_reject_search,
    "mtgnet_search": mtgnet_search,
    "active_etap_search": active_etap_search,
})

__all__ = [
    "ACCEPT_RULES",
    "ANSWERS",
    "INITIAL_DESIGNS",
    "OBJECTIVES",
    "QUICK_REJECT_SCHEDULE",
    "SEARCH_PRIOR_GRID",
    "STRATEGIES",
    "OracleTrainer",
    "SearchResult",
    "SearchStep",
    "active_etap_search",
    "bootstrap_template",
    "has_posterior",
    "load_table",
    "mtgnet_search",
    "quick_reject_probability",
    "quick_reject_search",
    "random_search",
    "random_selection",
    "swap_improvements",
    "total_test_loss",
]
