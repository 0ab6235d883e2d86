"""Which free GPUs a claim gets.

Policy: among the free healthy candidates, pick `count` GPUs whose worst pairwise distance
(an NVML topology level: same PCIe switch < same CPU socket < across sockets) is smallest,
so a multi-GPU job talks over the shortest links; ties go to the set with the lowest indices.
With flat (unknown) distances that is simply the lowest free indices.

An exact search over every subset is too slow for 16 GPUs in a request, so each candidate
seeds a greedy set that keeps adding the candidate closest to everything already chosen
(lowest index on ties), and the best of those sets wins. For a tree of switches and sockets
(what NVML topology levels describe) this finds the smallest worst distance exactly; it costs
n^2 distance lookups and about n^2 * count comparisons.
"""

from __future__ import annotations

from collections.abc import Callable


def choose_gpus(candidates: list[int], count: int, distance: Callable[[int, int], int]) -> list[int]:
    """`count` of the candidate GPU indices, closest together first, in ascending order.

    The caller checks there are enough candidates; given too few, all of them come back.
    """
    pool = sorted(set(candidates))
    if count <= 0:
        return []
    if count >= len(pool):
        return pool
    if count == 1:
        return pool[:1]

    dist = {(a, b): distance(a, b) for a in pool for b in pool if a < b}

    def apart(a: int, b: int) -> int:
        return dist[(a, b)] if a < b else dist[(b, a)]

    best: tuple[int, list[int]] | None = None
    for seed in pool:
        chosen = [seed]
        worst = 0
        while len(chosen) < count:
            reach, gpu = min((max(apart(c, g) for c in chosen), g) for g in pool if g not in chosen)
            chosen.append(gpu)
            worst = max(worst, reach)
        score = (worst, sorted(chosen))
        if best is None or score < best:
            best = score
    return best[1]
