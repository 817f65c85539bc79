"""Covering arrays of strength t: built greedily, shrunk by post-optimisation, verified.

A suite of strength t holds, for every t parameters and every choice of one value of each,
a row with those values (a *t-tuple*). :mod:`taskexec.plan.matrix` drafts one (allpairspy at
strength 2); this module indexes the t-tuples, completes a draft greedily, and shrinks it:

1. delete the row that alone holds the fewest tuples;
2. repair the tuples it alone held by a local search over single-cell changes: take an
   uncovered tuple at random, consider every row that misses it by one cell, make the
   change that covers the most tuples net, a changed cell kept from changing again for a
   few steps (Nurmela's tabu search, as Nayeri, Colbourn and Konjevod use it to
   post-optimise covering arrays);
3. once nothing is uncovered, keep the suite and go back to 1, until a budget of steps
   is spent; the last complete suite is the result.

Everything works on value indexes. Exclusions are :class:`Constraints`: no row may match
one, and a change that would make a row match one is never made; a tuple that no allowed
row can hold is *unreachable* and not needed. Randomness comes from one
:class:`random.Random` with a fixed seed and no iteration depends on string hashing, so
the same model gives the same suite in every process.

Rows have to be changed in place millions of times in pure Python, so the state is kept in
flat lists and bytearrays; a change of one cell is scored by two ANDs and popcounts of bit
masks at strength 2, by C-level ``map`` over precomputed index arithmetic above, never by
a Python loop over the tuples (the loop took five times as long on 10^20).

Modules: :mod:`~taskexec.plan.covering.constraints` (exclusions), :mod:`~taskexec.plan.covering.tuples`
(numbering, lower bound, verifier), :mod:`~taskexec.plan.covering.suite` (the state and the
greedy builder), :mod:`~taskexec.plan.covering.search` (post-optimisation).
"""

from taskexec.plan.covering.constraints import Constraints, Row, Rule
from taskexec.plan.covering.search import shrink
from taskexec.plan.covering.suite import Suite
from taskexec.plan.covering.tuples import Tuples, lower_bound, verify

__all__ = ["SEED", "Constraints", "Row", "Rule", "Suite", "Tuples", "lower_bound", "shrink", "verify"]

SEED = 19  # the post-optimiser's seed: a constant, so that a plan compiles alike everywhere
