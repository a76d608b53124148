"""Exhaustive interleaving model of the ping-pong kernel's synchronisation (``kernels/gluon_mla.py``:
``_pp_consumer`` for warpgroups 0 and 1, ``_pp_producer``), for checking a change to its barriers without a GPU.

Each partition is a list of operations in program order (barrier waits with their parity, arrivals, TMA
issue / completion, reads and writes of the key slots, the P buffers and the (m, l) exchange, the rescales of
O); every interleaving is explored for n_tiles = 0 … 8, with the other warpgroup's P·V synchronous and
asynchronous (``pingpong="overlap"``). Checked: no wait passes or blocks on the wrong phase (parity aliasing),
no deadlock, no slot or P buffer overwritten while a wgmma reads it, every rescale applied to an O scaled to
the max it assumes, both warpgroups ending with the same (m, l) over every tile, each slot released twice and
each P buffer handed off once. The model mirrors the kernel by hand: change both together.

    python benchmarks/pingpong_protocol_model.py          # exits non-zero on any finding

(``run(n, overlap, False)`` replays the inverted final-step condition: it deadlocks or drops a tile.)

It found the inverted condition of the final "other's last tile" step (session 7; the kernel had not run yet).
"""
import sys
from collections import deque
NBUF = 2
FS = frozenset

def wg_prog(N, ME, OVERLAP, TAIL_EQ):
    ops = []
    def scores(j):
        ops.append(('wait', ('ready', j % NBUF), (j // NBUF) & 1, j // NBUF))
        if j == N - 1:
            ops.append(('zero', j % NBUF, j))
        ops.append(('use', 'slot', j % NBUF, j))
        ops.append(('scores', j))
    def receive(i):
        ops.append(('wait', ('ready', i % NBUF), (i // NBUF) & 1, i // NBUF))
        ops.append(('wait', ('pfull', 1 - ME), (i // 2) & 1, i // 2))
        ops.append(('recv', i))            # read st[1-ME], rescale acc
    def pv_other(i, asyn):
        ops.append(('pv_start', i, asyn))  # reads p[1-ME], slot i%NBUF
        if not asyn:
            ops.append(('pv_end', i))
    def publish(j):
        ops.append(('wait', ('pempty', ME), ((j // 2) & 1) ^ 1, j // 2 - 1))
        ops.append(('publish', j))          # write p[ME], st[ME]
        ops.append(('arrive', ('pfull', ME), j))
    def own_pv(j):
        ops.append(('own_pv', j))           # rescale own alpha, reads slot j
        ops.append(('arrive', ('empty', j % NBUF), j))
    if ME == 0:
        if N > 0:
            scores(0); publish(0); own_pv(0)
        first, steps = 1, (N + 1) // 2
    else:
        first, steps = 0, N // 2
    for k in range(first, steps):
        j = 2 * k + ME; i = j - 1
        scores(j); receive(i); pv_other(i, OVERLAP); publish(j)
        if OVERLAP:
            ops.append(('pv_end', i))
        ops.append(('arrive', ('pempty', 1 - ME), i))
        ops.append(('arrive', ('empty', i % NBUF), i))
        own_pv(j)
    cond = (N % 2 == ME) if TAIL_EQ else (N % 2 != ME)
    if cond:
        i = N - 1
        if i >= 0:
            receive(i); pv_other(i, False)
            ops.append(('arrive', ('pempty', 1 - ME), i))
            ops.append(('arrive', ('empty', i % NBUF), i))
    return ops

def prod_prog(N):
    ops = []
    for j in range(N):
        s = j % NBUF
        ops.append(('wait', ('empty', s), ((j // NBUF) & 1) ^ 1, j // NBUF - 1))
        ops.append(('tma_issue', s, j))
        ops.append(('tma_done', s, j))
    return ops

COUNTS = {('ready', 0): 1, ('ready', 1): 1, ('empty', 0): 2, ('empty', 1): 2,
          ('pfull', 0): 1, ('pfull', 1): 1, ('pempty', 0): 1, ('pempty', 1): 1}
BARS = sorted(COUNTS); BI = {b: n for n, b in enumerate(BARS)}

def run(N, OVERLAP, TAIL_EQ):
    progs = [wg_prog(N, 0, OVERLAP, TAIL_EQ), wg_prog(N, 1, OVERLAP, TAIL_EQ), prod_prog(N)]
    # per-WG value state: (m, l, acc, sc, alpha_own, inflight)
    #  m: frozenset of tiles in the max; l: (tiles, ref m); acc: (tiles, ref m) ; sc: tile of own scores
    wg0 = (FS(), (FS(), FS()), (FS(), FS()), None, None)
    init = dict(pcs=(0, 0, 0), pend=tuple(COUNTS[b] for b in BARS), ph=tuple(0 for b in BARS),
                slots=tuple([None] * NBUF), p=(None, None), st=(None, None), wgs=(wg0, wg0), infl=((), ()),
                rel=())
    key = lambda d: tuple(d[k] for k in ('pcs', 'pend', 'ph', 'slots', 'p', 'st', 'wgs', 'infl', 'rel'))
    seen = {key(init)}; dq = deque([init]); bad = set(); dead = set(); finals = set()
    while dq:
        S = dq.popleft()
        moved = False
        for w in range(3):
            pc = S['pcs'][w]
            if pc >= len(progs[w]): continue
            op = progs[w][pc]
            T = dict(S); pend = list(S['pend']); ph = list(S['ph']); slots = list(S['slots'])
            p = list(S['p']); st = list(S['st']); wgs = list(S['wgs']); infl = list(S['infl']); rel = list(S['rel'])
            def err(msg): bad.add((N, w, op, msg))
            other_infl = [r for x in infl for r in x]
            if op[0] == 'wait':
                b = BI[op[1]]; par, n = op[2], op[3]
                passes = (ph[b] & 1) != par
                truth = ph[b] > n
                if passes != truth: err('parity ABA ph=%d n=%d' % (ph[b], n))
                if not passes: continue
            elif op[0] == 'arrive':
                b = BI[op[1]]
                rel.append((op[1][0], op[2], w))
                pend[b] -= 1
                if pend[b] == 0: pend[b] = COUNTS[op[1]]; ph[b] += 1
            elif op[0] == 'tma_issue':
                s, j = op[1], op[2]
                if ('slot', s) in other_infl: err('TMA overwrites slot read by in-flight wgmma')
                slots[s] = ('loading', j)
            elif op[0] == 'tma_done':
                s, j = op[1], op[2]
                slots[s] = (j, False); ph[BI[('ready', s)]] += 1
            elif op[0] == 'zero':
                s, j = op[1], op[2]
                if slots[s] != (j, False): err('zero on wrong content %r' % (slots[s],))
                if ('slot', s) in other_infl: err('zero while in-flight read')
                slots[s] = (j, True)
            elif op[0] == 'use':
                s, j = op[2], op[3]
                if slots[s] is None or slots[s][0] != j: err('slot %d has %r want %d' % (s, slots[s], j))
            else:
                ME = w
                m, l, acc, sc, aown = wgs[ME]
                inf = list(infl[ME])
                def chk_slot(s, j):
                    want = (j, j == N - 1)
                    if slots[s] != want: err('slot %d has %r want %r' % (s, slots[s], want))
                if op[0] == 'scores':
                    sc = op[1]
                elif op[0] == 'recv':
                    i = op[1]
                    if st[1 - ME] is None or st[1 - ME][0] != i: err('st has %r want tile %d' % (st[1 - ME], i)); continue
                    _, sm, sl = st[1 - ME]
                    if inf: err('acc rescaled while wgmma in flight')
                    if acc[1] != m: err('acc ref %r != m %r at recv' % (acc[1], m))
                    if not (sm >= m): err('received max not superset')
                    acc = (acc[0], sm); m, l = sm, sl
                elif op[0] == 'pv_start':
                    i = op[1]
                    if p[1 - ME] is None or p[1 - ME][0] != i: err('p has %r want %d' % (p[1 - ME], i))
                    chk_slot(i % NBUF, i)
                    pref = p[1 - ME][1] if p[1 - ME] else None
                    if acc[1] != pref: err('acc ref != P ref at pv %d' % i)
                    inf = [('p', 1 - ME), ('slot', i % NBUF)]
                    acc = (acc[0] | {i}, acc[1])
                elif op[0] == 'pv_end':
                    i = op[1]
                    if p[1 - ME] is None or p[1 - ME][0] != i: err('p changed in flight: %r' % (p[1 - ME],))
                    chk_slot(i % NBUF, i)
                    inf = []
                elif op[0] == 'publish':
                    j = op[1]
                    if sc != j: err('publish without scores')
                    if ('p', ME) in other_infl: err('P overwritten while other wgmma reads it')
                    if l[1] != m: err('l ref')
                    mn = m | {j}
                    l = (l[0] | {j}, mn)
                    aown = (m, mn)
                    m = mn
                    p[ME] = (j, mn); st[ME] = (j, m, l)
                elif op[0] == 'own_pv':
                    j = op[1]
                    if inf: err('own rescale while wgmma in flight')
                    if acc[1] != aown[0]: err('own alpha from %r but acc ref %r' % (aown[0], acc[1]))
                    acc = (acc[0] | {j}, aown[1])
                    chk_slot(j % NBUF, j)
                wgs[ME] = (m, l, acc, sc, aown); infl[ME] = tuple(inf)
            pcs = list(S['pcs']); pcs[w] += 1
            T.update(pcs=tuple(pcs), pend=tuple(pend), ph=tuple(ph), slots=tuple(slots), p=tuple(p), st=tuple(st),
                     wgs=tuple(wgs), infl=tuple(infl), rel=tuple(sorted(rel)))
            moved = True
            k = key(T)
            if k not in seen: seen.add(k); dq.append(T)
        if not moved:
            if any(S['pcs'][w] < len(progs[w]) for w in range(3)):
                dead.add(S['pcs'])
            else:
                finals.add((S['wgs'], S['rel']))
    # final checks
    allt = FS(range(N))
    fin_bad = set()
    for wgs, rel in finals:
        for ME in (0, 1):
            m, l, acc, _, _ = wgs[ME]
            if N and not (m == allt and l == (allt, allt) and acc == (allt, allt)):
                fin_bad.add('WG%d final m=%s l=%s acc=%s' % (ME, sorted(m), (sorted(l[0]), sorted(l[1])), (sorted(acc[0]), sorted(acc[1]))))
        from collections import Counter
        c = Counter((k, t) for k, t, w in rel)
        for t in range(N):
            if c[('empty', t)] != 2: fin_bad.add('tile %d released %d times' % (t, c[('empty', t)]))
            if c[('pfull', t)] != 1: fin_bad.add('P_%d published %d' % (t, c[('pfull', t)]))
            if c[('pempty', t)] != 1: fin_bad.add('P_%d freed %d' % (t, c[('pempty', t)]))
        if sum(c.values()) != 4 * N: fin_bad.add('extra arrivals %r' % dict(c))
    return len(seen), bad, dead, fin_bad, len(finals)

def main() -> int:
    failed = False
    for OVERLAP in (False, True):
        for N in range(0, 9):
            n, bad, dead, fb, nf = run(N, OVERLAP, True)
            ok = not bad and not dead and not fb and nf == 1
            failed |= not ok
            print(f"overlap={OVERLAP} n_tiles={N}: {n} states, {nf} final state(s)"
                  + ("" if ok else f"; findings {sorted(bad)[:2]} deadlocks {sorted(dead)[:2]} {sorted(fb)[:3]}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
