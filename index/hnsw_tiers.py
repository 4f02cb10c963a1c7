"""The HNSW merger's policy (index/hnsw_strand.py): which graphs of a strand to rebuild into one.

An LSM tree's tiering: TIER_FANOUT adjacent graphs of one size tier (tier t: live rows in
[TIER_UNIT x 4^t, TIER_UNIT x 4^(t+1))) are rebuilt into one; a graph whose deletes reach
TOMBSTONE_RATIO is rebuilt alone (``next_merge``). Once the strand is idle (no seal nor write
for hnsw_strand.IDLE_MERGE_S) every graph is rebuilt into one when the graphs besides the
largest hold IDLE_MERGE_SHARE of the live rows (``worth_one_graph``): a strand that was loaded
and then queried is searched as one graph, while a steady trickle of writes (a seal a minute)
keeps the tiers instead of rebuilding the whole field after each seal.

The constants are read at call time (tests shrink them).
"""

from __future__ import annotations

import math

from .hnsw_parts import Graph

TIER_UNIT = 8 * 1024  # 8 sealed blocks (hnsw_strand.SEAL_ROWS): graphs below 4 x this many live rows are tier 0
TIER_FACTOR = 4
TIER_FANOUT = 4  # this many adjacent graphs of one tier are merged into one
TOMBSTONE_RATIO = 0.25  # a graph with this share of its labels deleted is rebuilt from its live vectors
IDLE_MERGE_SHARE = 0.1  # an idle strand merges every graph when those besides the largest hold this share


def next_merge(graphs: tuple[Graph, ...]) -> tuple[int, int] | None:
    """The next merge (graphs[start:end]) the tier policy wants, or None."""
    for i, graph in enumerate(graphs):
        if graph.dead and graph.dead >= TOMBSTONE_RATIO * len(graph.labels):
            return i, i + 1
    tiers = [tier(graph.live) for graph in graphs]
    for level in sorted(set(tiers)):
        run = 0
        for i, t in enumerate(tiers):
            run = run + 1 if t == level else 0
            if run == TIER_FANOUT:
                return i + 1 - TIER_FANOUT, i + 1
    return None


def worth_one_graph(graphs: tuple[Graph, ...]) -> bool:
    """Whether merging every graph into one pays: a trickle of writes must not rebuild a big graph
    for every small one it seals (the tiers bound those)."""
    if len(graphs) < 2:
        return False
    lives = [graph.live for graph in graphs]
    return sum(lives) - max(lives) >= IDLE_MERGE_SHARE * sum(lives)


def tier(rows: int) -> int:
    return max(0, int(math.log(max(rows, 1) / TIER_UNIT, TIER_FACTOR))) if rows >= TIER_UNIT else 0
