#!/usr/bin/env python3
# Probe behind docs/benchmarks.md, "The spare snapshot": fdatasync latency of four
# journal-like writers (128 KiB O_DIRECT write + fdatasync, 160 a second each) while a
# checkpoint follower writes three 130 MB snapshots at 128 MiB/s, either into new files,
# releasing the old one in 4 MiB steps after each (as before), or over one kept file
# (the spare). Modes alternate, ROUNDS pairs. Usage: snapshot-spare-probe.py DIR [ROUNDS];
# DIR on the disk to measure, emptied after each run.
import os, mmap, threading, time, sys
D = sys.argv[1]; ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
SNAP = 130 << 20; CHUNK = 1 << 20; RATE = 128 << 20
WRITERS = 4; WBYTES = 128 << 10; WRATE = 160
os.makedirs(D, exist_ok=True)
def buf(n, fill):
    m = mmap.mmap(-1, n); m.write(bytes([fill]) * n); return m
def prewrite(path, size):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    b = buf(CHUNK, 1)
    for off in range(0, size, CHUNK): os.pwrite(fd, b, off)
    os.fsync(fd); os.close(fd)
def writer(i, stop, lat):
    path = f"{D}/j{i}"; fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    b = buf(WBYTES, 2); off = 0; nxt = time.monotonic()
    while not stop.is_set():
        t = time.monotonic(); os.pwrite(fd, b, off); os.fdatasync(fd); lat.append(time.monotonic() - t)
        off = (off + WBYTES) % (64 << 20); nxt += 1 / WRATE
        d = nxt - time.monotonic()
        if d > 0: time.sleep(d)
    os.close(fd)
def paced_write(fd):
    b = buf(CHUNK, 3); t0 = time.monotonic()
    for k, off in enumerate(range(0, SNAP, CHUNK)):
        os.pwrite(fd, b, off)
        d = t0 + (k + 1) * CHUNK / RATE - time.monotonic()
        if d > 0: time.sleep(d)
    os.fdatasync(fd)
def release(path):
    fd = os.open(path, os.O_RDWR); size = os.fstat(fd).st_size
    while size > 0:
        size = max(0, size - (4 << 20)); os.ftruncate(fd, size); time.sleep(0.002)
    os.close(fd); os.unlink(path)
def follower_new(k):
    old = f"{D}/snap-old"; new = f"{D}/snap-new"
    fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    paced_write(fd); os.close(fd); os.rename(new, f"{D}/snap-cur-{k}")
    release(old); os.rename(f"{D}/snap-cur-{k}", old)
def follower_reuse(k):
    spare = f"{D}/snap-old"
    fd = os.open(spare, os.O_RDWR | os.O_DIRECT); paced_write(fd); os.close(fd)
def run(mode):
    prewrite(f"{D}/snap-old", SNAP)
    for i in range(WRITERS): prewrite(f"{D}/j{i}", 64 << 20)
    stop = threading.Event(); lat = []
    ws = [threading.Thread(target=writer, args=(i, stop, lat)) for i in range(WRITERS)]
    for w in ws: w.start()
    time.sleep(0.5); lat.clear(); t0 = time.monotonic()
    for k in range(3): (follower_new if mode == "new+release" else follower_reuse)(k)
    took = time.monotonic() - t0
    stop.set(); [w.join() for w in ws]
    l = sorted(x * 1e3 for x in lat)
    q = lambda p: l[min(len(l) - 1, int(p * len(l)))]
    print(f"{mode:12s} {took:5.2f} s  n {len(l):5d}  p50 {q(.5):.2f}  p99 {q(.99):.2f}  p999 {q(.999):.2f}  max {l[-1]:.2f} ms", flush=True)
    for f in os.listdir(D): os.unlink(f"{D}/{f}")
for r in range(ROUNDS):
    for mode in (["new+release", "reuse"] if r % 2 == 0 else ["reuse", "new+release"]):
        run(mode)
