# Futures created on worker A passed to calls on worker B which fetch them; GC; leak check
import faulthandler, sys, os, time, threading, gc, random
faulthandler.dump_traceback_later(55, exit=True)
import distexec as dx

def make(x):
    time.sleep(random.random() * 0.01)
    return x * 2

def big(x):
    return bytes(200000) + x.to_bytes(4, "little")

def use(f):
    v = f.fetch() if hasattr(f, "fetch") else f
    return v

def use_many(fs):
    return [f.fetch() if not isinstance(f.fetch(), bytes) else int.from_bytes(f.fetch()[-4:], "little") for f in fs]

def relay(f, pid):
    # pass the future further on to another worker
    return dx.remotecall_fetch(use, pid, f)

ITERS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
ps = dx.addprocs(3)
bad = 0
for it in range(ITERS):
    A, B, C = random.sample(ps, 3)
    fs = [dx.remotecall(make if i % 3 else big, A, i) for i in range(60)]
    # some fetched on B one by one, some in a batch, some relayed B->C
    outs = []
    for i, f in enumerate(fs[:20]):
        outs.append(dx.remotecall(use, B, f))
    batch = dx.remotecall(use_many, B, fs[20:40])
    rel = [dx.remotecall(relay, B, f, C) for f in fs[40:]]
    # master fetches some too, racing
    if it % 2:
        for f in fs[::7]: f.fetch()
    exp = lambda i: (i * 2) if i % 3 else None
    for i, o in enumerate(outs):
        v = o.fetch(timeout=30)
        if i % 3 == 0:
            if not (isinstance(v, bytes) and int.from_bytes(v[-4:], "little") == i): bad += 1; print("ITER", it, "bad outs", i)
        elif v != i * 2: bad += 1; print("ITER", it, "bad outs", i, v)
    bv = batch.fetch(timeout=30)
    if bv != [i * 2 if i % 3 else i for i in range(20, 40)]: bad += 1; print("ITER", it, "bad batch", bv)
    for j, r in enumerate(rel):
        i = 40 + j
        v = r.fetch(timeout=30)
        if i % 3 == 0:
            if not (isinstance(v, bytes) and int.from_bytes(v[-4:], "little") == i): bad += 1; print("ITER", it, "bad rel", i)
        elif v != i * 2: bad += 1; print("ITER", it, "bad rel", i, v)
    del fs, outs, batch, rel, o, r, f
    gc.collect()
    for p in ps: dx.remotecall_fetch(gc.collect, p)
gc.collect()
time.sleep(1.0)
for p in ps: dx.remotecall_fetch(gc.collect, p)
time.sleep(1.0)
st = [dx.statistics()] + [dx.remotecall_fetch(dx.statistics, p) for p in ps]
for s in st: print(s.myid, "owned", s.owned_refs, "client", s.client_refs, "awaiting", s.awaiting_futures, "pending", s.pending_calls)
print("bad", bad)
dx.rmprocs(*ps)
print("done")
