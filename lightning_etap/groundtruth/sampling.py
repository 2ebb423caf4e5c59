"""Which task groups to train for ground truth.

Every group leaves this module in *canonical form*: a tuple of task names in
the dataset's task order, so ``("b", "a")`` and ``("a", "b")`` are the same
group and the same row in a :class:`~lightning_etap.groundtruth.GainStore`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from math import comb

import numpy as np

__all__ = ["SAMPLING_METHODS", "canonical_group", "check_seeds", "group_key", "parse_group_key", "sample_groups"]

#: The ways :func:`sample_groups` can choose groups.
SAMPLING_METHODS: tuple[str, ...] = ("uniform_size", "pairs", "all", "given")

#: Separator of task names in a group key (``"a|b|c"``); task names may not contain it.
KEY_SEP = "|"

# Sizes with at most this many groups are sampled exactly from the groups not yet drawn;
# bigger ones by redrawing a group of that size until it is new (never near exhaustion).
_ENUMERATE_LIMIT = 4096


def _task_list(task_names) -> list[str]:
    names = getattr(task_names, "task_names", task_names)  # a MultiTaskDataset or a sequence
    if isinstance(names, str):
        raise ValueError(f"task_names must be a sequence of names, not the string {names!r}")
    names = [str(t) for t in names]
    if not names:
        raise ValueError("task_names is empty: there are no tasks to group")
    if len(set(names)) != len(names):
        dup = sorted({t for t in names if names.count(t) > 1})
        raise ValueError(f"duplicate task names {dup}")
    bad = [t for t in names if KEY_SEP in t]
    if bad:
        raise ValueError(
            f"task names {bad} contain {KEY_SEP!r}, which separates tasks in group keys; rename the tasks"
        )
    return names


def canonical_group(group: Iterable[str], task_names: Sequence[str]) -> tuple[str, ...]:
    """A group as a tuple of task names in the order of ``task_names``.

    Raises:
        ValueError: a string instead of a sequence, an empty group, an unknown
            task or a task listed twice.
    """
    if isinstance(group, str):
        hint = (" (a single group given where a list of groups is expected? pass [group])"
                if group in {str(t) for t in task_names} else "")
        raise ValueError(f"a group must be a sequence of task names, not the string {group!r}{hint}")
    order = {t: i for i, t in enumerate(str(t) for t in task_names)}
    given = list(group)
    numbers = [t for t in given if isinstance(t, (int, np.integer)) and not isinstance(t, bool)]
    if numbers and not all(str(t) in order for t in numbers):
        raise ValueError(f"group {given} holds task indices ({numbers[0]!r}); groups here are task names: pass "
                         f"[task_names[i] for i in group] (known tasks: {list(order)})")
    members = [str(t) for t in given]
    if not members:
        raise ValueError("empty group: every group needs at least one task")
    unknown = [t for t in members if t not in order]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in group {members}; known tasks: {list(order)}")
    if len(set(members)) != len(members):
        dup = sorted({t for t in members if members.count(t) > 1})
        raise ValueError(f"task(s) {dup} listed twice in group {members}")
    return tuple(sorted(members, key=order.__getitem__))


def check_seeds(seeds: Iterable[int]) -> list[int]:
    """Training seeds as a list of distinct ints (in the given order), with a clear error for a bare number."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(f"seeds must be a list of training seeds, e.g. seeds=[0] or seeds=[0, 1, 2]; got {seeds!r}")
    out = []
    for s in seeds:
        value = s.item() if getattr(s, "ndim", None) == 0 and hasattr(s, "item") else s  # numpy / torch scalars
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 0.0 from a float column
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"seeds must be whole numbers; got {s!r} ({type(s).__name__}) in {seeds!r}")
        out.append(int(value))
    if not out:
        raise ValueError("seeds is empty: give at least one training seed")
    return list(dict.fromkeys(out))


def group_key(group: Sequence[str]) -> str:
    """The store's key of a canonical group: its task names joined by ``"|"``."""
    return KEY_SEP.join(group)


def parse_group_key(key: str) -> tuple[str, ...]:
    """Inverse of :func:`group_key`."""
    return tuple(key.split(KEY_SEP))


def sample_groups(
    task_names,
    n_groups: int | None = None,
    *,
    method: str = "uniform_size",
    groups: Iterable[Sequence[str]] | None = None,
    min_size: int = 2,
    max_size: int | None = None,
    include_all_tasks: bool = False,
    seed: int = 0,
) -> list[tuple[str, ...]]:
    """Choose the task groups to train for ground-truth gains.

    Methods:

    * ``"uniform_size"`` (default): ``n_groups`` distinct groups; each draw
      picks a size uniformly in ``[min_size, max_size]`` and then a group of
      that size uniformly among those not drawn yet. A size whose groups are
      all drawn drops out of the size draw. Small sizes are thus not drowned
      by the many large groups, as in the paper's sampled ``G_train``.
    * ``"pairs"``: every pair of tasks (``n_groups`` of them, uniformly
      without replacement, when given).
    * ``"all"``: every group with ``min_size <= |G| <= max_size``
      (``n_groups`` of them, uniformly without replacement, when given).
    * ``"given"``: the groups in ``groups``, validated and put in canonical
      form, in the order given.

    Args:
        task_names: the tasks, in the dataset's order (or a
            :class:`~lightning_etap.data.MultiTaskDataset`).
        n_groups: how many groups (required for ``"uniform_size"``), counting
            the all-task group when ``include_all_tasks`` is set.
        method: one of :data:`SAMPLING_METHODS`.
        groups: the groups for ``method="given"``.
        min_size, max_size: group size range (``max_size`` defaults to all tasks).
        include_all_tasks: put the all-task group first (the released ETAP code
            always trains it). With ``"given"`` it is added unless already listed.
        seed: seed of the draw; the same seed gives the same list.

    Returns:
        Distinct groups, each a tuple of task names in ``task_names`` order.
        ``"pairs"`` and ``"all"`` list groups by size, then by task order;
        ``"uniform_size"`` in the order drawn.

    Raises:
        ValueError: unknown method, bad sizes, more groups asked for than
            exist, duplicate or invalid given groups.

    Example:
        >>> sample_groups(["a", "b", "c"], method="pairs")
        [('a', 'b'), ('a', 'c'), ('b', 'c')]
        >>> sample_groups(["a", "b", "c"], method="given", groups=[["c", "a"]], include_all_tasks=True)
        [('a', 'b', 'c'), ('a', 'c')]
    """
    names = _task_list(task_names)
    n = len(names)
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {list(SAMPLING_METHODS)}")
    everyone = tuple(names)

    if method == "given":
        if groups is None:
            raise ValueError("method='given' needs groups=[...] (sequences of task names)")
        out: list[tuple[str, ...]] = []
        seen: set[tuple[str, ...]] = set()
        for g in groups:
            c = canonical_group(g, names)
            if c in seen:
                raise ValueError(f"group {list(c)} is given twice; every group must be listed once")
            seen.add(c)
            out.append(c)
        if include_all_tasks and everyone not in seen:
            out.insert(0, everyone)
        if n_groups is not None and n_groups != len(out):
            raise ValueError(f"n_groups={n_groups} but {len(out)} groups were given; leave n_groups out")
        return out
    if groups is not None:
        raise ValueError(f"groups=... is only used with method='given', not method={method!r}")

    if method == "pairs":
        if n < 2:
            raise ValueError(f"pairs need at least 2 tasks, got {n}")
        lo = hi = 2
    else:
        hi = n if max_size is None else int(max_size)
        lo = int(min_size)
        if not 1 <= lo <= n:
            raise ValueError(f"min_size must be in [1, {n}] for {n} tasks, got {min_size}")
        if not lo <= hi <= n:
            raise ValueError(f"max_size must be in [min_size={lo}, {n}] for {n} tasks, got {max_size}")
    sizes = list(range(lo, hi + 1))
    first: list[tuple[str, ...]] = [everyone] if include_all_tasks else []
    available = sum(comb(n, k) for k in sizes) - (1 if include_all_tasks and hi == n else 0)
    if n_groups is None:
        if method == "uniform_size":
            raise ValueError("method='uniform_size' needs n_groups (how many groups to draw)")
        wanted = available
    else:
        if int(n_groups) != n_groups or n_groups < len(first):
            raise ValueError(f"n_groups must be an integer >= {len(first)}, got {n_groups}")
        wanted = int(n_groups) - len(first)
    if wanted > available:
        extra = " besides the all-task group" if first else ""
        raise ValueError(
            f"asked for {wanted} distinct groups{extra} of size {lo}..{hi} out of {n} tasks, but only "
            f"{available} exist; ask for fewer or widen the size range"
        )
    rng = np.random.default_rng(seed)

    if method in ("pairs", "all"):
        candidates = [c for k in sizes for c in itertools.combinations(range(n), k) if len(c) < n or not first]
        if wanted < len(candidates):
            keep = np.sort(rng.choice(len(candidates), size=wanted, replace=False))
            candidates = [candidates[i] for i in keep]
        return first + [tuple(names[i] for i in c) for c in candidates]

    # uniform over sizes, then uniform among the not-yet-drawn groups of that size
    drawn: set[tuple[int, ...]] = {tuple(range(n))} if first else set()
    left = {k: comb(n, k) - (1 if first and k == n else 0) for k in sizes}
    pools: dict[int, list[tuple[int, ...]]] = {}
    out_idx: list[tuple[int, ...]] = []
    while len(out_idx) < wanted:
        open_sizes = [k for k in sizes if left[k] > 0]
        k = open_sizes[int(rng.integers(len(open_sizes)))]
        if comb(n, k) <= _ENUMERATE_LIMIT:
            pool = pools.setdefault(k, [c for c in itertools.combinations(range(n), k) if c not in drawn])
            group = pool.pop(int(rng.integers(len(pool))))
        else:
            while True:
                group = tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False)))
                if group not in drawn:
                    break
        drawn.add(group)
        left[k] -= 1
        out_idx.append(group)
    return first + [tuple(names[i] for i in g) for g in out_idx]
