"""Randomised interleaving model of the Gluon MHA window kernel's key ring with ``REUSE`` (``kernels/gluon_mha.py``:
``_mha_item``, ``_item_of``, ``_local_items``, ``_shift``, ``_mha_producer``, ``_mha_consumer``), for checking a
change to its tile arithmetic or barriers without a GPU.

With ``REUSE`` a program takes consecutive query tiles of a head, and the key tiles two consecutive items share
stay in the ring: the producer loads only the tiles the ring does not hold (stream index ``s`` into slot
``s % NBUF``), and each compute warpgroup releases a tile after the last item that reads it. The index math is
copied from the kernel by hand (change both together). For random ragged steps (chunks of 1 … 700 tokens after
0 … 3000 cached, windows 1 … 1024 and full causal, sinks, 1 … 3 heads, 1 … 9 programs, both ``REUSE`` settings,
``NBUF`` 2 … 4) and random interleavings of each program's three partitions, it checks:

- no deadlock, and no barrier wait passing on another round's phase (mbarrier parity semantics);
- every tile a warpgroup reads holds the rows it expects for its item (head and workspace row): the rows of a
  reused tile are those the earlier item's load put there;
- each item's key tiles cover its queries' windows (the first tile starts at or before the first query's window,
  the last ends after the last query) and the sink rows;
- every key slot released twice per load, and nothing left loaded but unreleased at the end.

    python benchmarks/mha_reuse_protocol_model.py            # exits non-zero on any finding
"""

from __future__ import annotations

import random
import sys

BLOCK_M, BLOCK_N = 128, 64
FULL_WINDOW = 1 << 30


def cdiv(a, b):
    return -(-a // b)


def mha_item(item, n_tiles_all, tile_b, tile_cu, cu, dec, kv_cu, window, sinks, reuse):
    h, tile = item // n_tiles_all, item % n_tiles_all
    b = tile_b[tile]
    cu_b = cu[b]
    c_b = cu[b + 1] - cu_b
    dec_b = dec[b]
    base = kv_cu[b]
    i0 = (tile - tile_cu[b]) * BLOCK_M
    n_q = min(c_b - i0, BLOCK_M)
    p0 = dec_b + i0
    p1 = p0 + n_q - 1
    a_b = max(dec_b - window + 1, 0)
    ns_b = min(sinks, a_b)
    lo = max(a_b, p0 - window + 1)
    n_sink = ns_b + max(min(sinks, lo) - a_b, 0)
    if reuse and sinks == 0:
        lo = a_b + ((lo - a_b) // BLOCK_N) * BLOCK_N
    win0 = base + ns_b - a_b
    n_st = cdiv(n_sink, BLOCK_N)
    n_wt = cdiv(max(p1 + 1 - lo, 0), BLOCK_N)
    return dict(h=h, b=b, tok0=cu_b + i0, n_q=n_q, p0=p0, p1=p1, lo=lo, n_sink=n_sink, base=base, win0=win0,
                n_st=n_st, n_wt=n_wt, a_b=a_b)


def item_of(pid, nprog, j, total, reuse):
    return pid * cdiv(total, nprog) + j if reuse else pid + j * nprog


def local_items(pid, nprog, total, reuse):
    if reuse:
        per = cdiv(total, nprog)
        return min(max(total - pid * per, 0), per)
    return cdiv(max(total - pid, 0), nprog)


def shift(pid, nprog, j, n_local, total, it, n, step, nbuf, reuse):
    if reuse and j + 1 < n_local:
        it2 = step.item(item_of(pid, nprog, j + 1, total, reuse))
        d = (it2["lo"] - it["lo"]) // BLOCK_N
        ok = (step.sinks == 0 and it2["h"] == it["h"] and it2["b"] == it["b"] and it2["lo"] >= it["lo"]
              and (it2["lo"] - it["lo"]) % BLOCK_N == 0 and d <= n and n - d <= nbuf
              and it2["n_st"] + it2["n_wt"] >= n - d)
        return d if ok else n
    return n


def tile_row(it, t):
    return it["base"] + t * BLOCK_N if t < it["n_st"] else it["win0"] + it["lo"] + (t - it["n_st"]) * BLOCK_N


class Step:
    def __init__(self, rng):
        B = rng.randint(1, 4)
        self.window = rng.choice([1, 7, 64, 65, 128, 129, 200, 256, 512, 777, 1024, FULL_WINDOW])
        self.sinks = rng.choice([0, 0, 0, 1, 3, 64, 100]) if self.window < FULL_WINDOW else 0
        self.Hg = rng.randint(1, 3)
        self.dec = [rng.choice([0, 0, 5, 127, 128, 1000, 3000]) for _ in range(B)]
        self.cu = [0]
        for _ in range(B):
            self.cu.append(self.cu[-1] + rng.choice([1, 2, 63, 64, 127, 128, 129, 300, 511, 700]))
        self.kv_cu, self.tile_cu, self.tile_b = [0], [0], []
        for b in range(B):
            c = self.cu[b + 1] - self.cu[b]
            a_b = max(self.dec[b] - self.window + 1, 0)
            rows = min(self.sinks, a_b) + (self.dec[b] + c - a_b)
            self.kv_cu.append(self.kv_cu[-1] + rows)
            tiles = cdiv(c, BLOCK_M)
            self.tile_b += [b] * tiles
            self.tile_cu.append(self.tile_cu[-1] + tiles)
        self.n_tiles_all = self.tile_cu[-1]
        self.total = self.n_tiles_all * self.Hg

    def item(self, item):
        return mha_item(item, self.n_tiles_all, self.tile_b, self.tile_cu, self.cu, self.dec, self.kv_cu,
                        self.window, self.sinks, REUSE_NOW[0])


REUSE_NOW = [False]


class Barrier:
    def __init__(self, count):
        self.count, self.pending, self.phase = count, 0, 0        # phase: completed phases

    def passes(self, parity):               # try_wait.parity: the phase of this parity has completed
        return (self.phase & 1) != parity

    def arrive(self):
        self.pending += 1
        assert self.pending <= self.count, "more arrivals than the barrier's count"
        if self.pending == self.count:
            self.pending = 0
            self.phase += 1


def check_coverage(it, step, errors):
    first_window = max(it["a_b"], it["p0"] - step.window + 1)
    if it["n_wt"] and not (it["lo"] <= first_window and it["lo"] + it["n_wt"] * BLOCK_N > it["p1"]):
        errors.append(f"item tiles [{it['lo']}, +{it['n_wt']}x{BLOCK_N}) miss [{first_window}, {it['p1']}]")
    if it["n_st"] * BLOCK_N < it["n_sink"]:
        errors.append("sink tiles miss sink rows")


def program_agents(pid, nprog, step, nbuf, reuse, slots, ready, empty, errors, log):
    total = step.total
    n_local = local_items(pid, nprog, total, reuse)

    def producer():
        start = loaded = 0
        for j in range(n_local):
            it = step.item(item_of(pid, nprog, j, total, reuse))
            check_coverage(it, step, errors)
            n = it["n_st"] + it["n_wt"]
            for t in range(loaded - start, n):
                s = start + t
                slot = s % nbuf
                while not empty[slot].passes(((s // nbuf) & 1) ^ 1):
                    yield
                if slots[slot] is not None and slots[slot][2] != "released":
                    errors.append(f"slot {slot} overwritten while held (stream {slots[slot][3]})")
                slots[slot] = [it["h"], tile_row(it, t), "loading", s, 0]
                yield                                             # the TMA lands later
                slots[slot][2] = "loaded"
                ready[slot].arrive()
                log.append(("load", pid, s))
            loaded = start + n
            start += shift(pid, nprog, j, n_local, total, it, n, step, nbuf, reuse)

    def consumer(me):
        start = 0
        for j in range(n_local):
            it = step.item(item_of(pid, nprog, j, total, reuse))
            n = it["n_st"] + it["n_wt"]
            sh = shift(pid, nprog, j, n_local, total, it, n, step, nbuf, reuse)
            for t in range(n):
                s = start + t
                slot = s % nbuf
                while not ready[slot].passes((s // nbuf) & 1):
                    yield
                got = slots[slot]
                if got is None or got[3] != s or got[2] != "loaded":
                    errors.append(f"warpgroup {me} item {j} tile {t}: slot {slot} holds {got}, expected stream {s}")
                elif (got[0], got[1]) != (it["h"], tile_row(it, t)):
                    errors.append(f"warpgroup {me} item {j} tile {t}: rows {got[:2]}, expected "
                                  f"{(it['h'], tile_row(it, t))}")
                yield                                             # the wgmma reads it
                if t < sh:
                    got[4] += 1
                    if got[4] == 2:
                        got[2] = "released"
                    empty[slot].arrive()
                    log.append(("release", pid, me, s))
            start += sh

    return [producer(), consumer(0), consumer(1)]


def run(seed):
    rng = random.Random(seed)
    step = Step(rng)
    reuse = rng.random() < 0.75
    REUSE_NOW[0] = reuse
    nbuf = rng.choice([2, 3, 3, 4])
    nprog = rng.randint(1, 9)
    errors = []
    for pid in range(nprog):
        slots = [None] * nbuf
        ready = [Barrier(1) for _ in range(nbuf)]
        empty = [Barrier(2) for _ in range(nbuf)]
        log = []
        agents = program_agents(pid, nprog, step, nbuf, reuse, slots, ready, empty, errors, log)
        live = list(agents)
        stuck = 0
        while live:
            a = rng.choice(live)
            try:
                next(a)
            except StopIteration:
                live.remove(a)
                stuck = 0
                continue
            stuck += 1
            if stuck > 20000:
                errors.append(f"deadlock: program {pid}, {len(live)} partitions waiting")
                break
            if errors:
                break
        if not errors:
            loads = sum(1 for e in log if e[0] == "load")
            releases = sum(1 for e in log if e[0] == "release")
            if releases != 2 * loads:
                errors.append(f"program {pid}: {loads} loads, {releases} releases")
        if errors:
            break
    return errors, dict(seed=seed, reuse=reuse, nbuf=nbuf, nprog=nprog, window=step.window, sinks=step.sinks,
                        Hg=step.Hg, dec=step.dec, cu=step.cu)


def main(n=3000):
    bad = 0
    shared = 0
    for seed in range(n):
        errors, cfg = run(seed)
        if errors:
            bad += 1
            print("FAIL", cfg, errors[:3])
            if bad > 5:
                break
    print(f"{n} random steps, {bad} failing")
    del shared
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
