"""Exclusions over value indexes: which rows are allowed, and which partial rows extend to one."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from typing import cast

Row = tuple[int, ...]  # one case as value indexes, in declaration order
Rule = dict[int, frozenset[int]]  # {parameter: the value indexes it matches}; all must match


class Constraints:
    """Exclusions over value indexes: which rows are allowed and which partial rows extend.

    Only parameters that some rule names can keep a partial row from becoming a case, so
    :meth:`completable` searches over those alone and remembers its answers: a search that
    fills a row never backtracks past one value, whatever sits in between.
    """

    def __init__(self, sizes: Sequence[int], rules: list[Rule], budget: int) -> None:
        self.sizes = list(sizes)
        self.rules = rules
        self.constrained = sorted({i for rule in rules for i in rule})
        self.is_constrained = [i in self.constrained for i in range(len(sizes))]
        # by_value[c][v]: the rules that setting c to v can complete (a change's only risk).
        self.by_value: list[list[list[Rule]]] = [[[] for _ in range(s)] for s in sizes]
        for rule in rules:
            for c, vs in rule.items():
                for v in vs:
                    self.by_value[c][v].append(rule)
        self._memo: dict[tuple[int | None, ...], bool] = {}
        self._work_left = budget

    def allowed(self, row: Sequence[int]) -> bool:
        """Whether no rule matches a complete row."""
        return not any(all(row[i] in vs for i, vs in rule.items()) for rule in self.rules)

    def allows(self, row: Sequence[int], c: int, v: int) -> bool:
        """Whether an allowed row stays allowed with its cell ``c`` set to ``v``."""
        return not any(all(i == c or row[i] in vs for i, vs in rule.items()) for rule in self.by_value[c][v])

    def viable(self, row: Sequence[int | None]) -> bool:
        """Whether a partial row matches no rule and leaves every free parameter a value.

        The second half is forward checking: a rule whose other keys all match bans its
        values of the one free key, and a parameter left with no value dooms the row.
        """
        banned: dict[int, set[int]] = {}
        for rule in self.rules:
            free = -1
            for i, vs in rule.items():
                v = row[i]
                if v is None:
                    if free >= 0:
                        break
                    free = i
                elif v not in vs:
                    break
            else:
                if free < 0:
                    return False
                ban = banned.setdefault(free, set())
                ban |= rule[free]
                if len(ban) == self.sizes[free]:
                    return False
        return True

    def completable(self, row: Sequence[int | None]) -> bool:
        """Whether some allowed complete row extends a partial row.

        Raises:
            ValueError: The search spent its budget: partial assignments can encode any
                satisfiability problem, so the answer may take exponential time.
        """
        if not self.rules:
            return True
        key = tuple(row[i] for i in self.constrained)
        found = self._memo.get(key)
        if found is None:
            free = [i for i in self.constrained if row[i] is None]
            found = self._memo[key] = self._extend(list(row), free, 0)
        return found

    def _extend(self, row: list[int | None], free: list[int], depth: int) -> bool:
        self._work_left -= len(self.rules)
        if self._work_left < 0:
            raise ValueError("the exclusions are too intricate to search for cases")
        if not self.viable(row):
            return False
        if depth == len(free):
            return True
        i = free[depth]
        for v in range(self.sizes[i]):
            row[i] = v
            if self._extend(row, free, depth + 1):
                return True
        row[i] = None
        return False

    def rows(
        self,
        row: list[int | None],
        order: Sequence[int],
        rank: Callable[[int], Iterable[int]],
        depth: int = 0,
    ) -> Generator[Row, None, None]:
        """The allowed rows extending ``row``, filling ``order`` in turn, values by ``rank``.

        Only values that keep the row completable are taken, so every step leads to a row.
        ``row`` is a work area: each position is reset when the generator moves on or closes.
        """
        if depth == len(order):
            yield cast(Row, tuple(row))  # every position is set by now
            return
        pos = order[depth]
        try:
            for v in rank(pos):
                row[pos] = v
                if not self.is_constrained[pos] or self.completable(row):
                    yield from self.rows(row, order, rank, depth + 1)
        finally:
            row[pos] = None
