#!/usr/bin/env python3
"""Talks to the test guest's TCP services through QEMU slirp port forwards
(127.0.0.1 only). Used as run-qemu.sh HOOK; ports from the environment
(ECHO_PORT, STREAM_PORT, DISCARD_PORT) or the command line.

  net-test.py [echo|conc|stream|discard|all|pause] [MiB]
  (pause needs QEMU_MONITOR, see run-qemu.sh MONITOR=1)
"""
import os
import socket
import struct
import sys
import threading
import time

HOST = "127.0.0.1"


def connect(port):
    s = socket.create_connection((HOST, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s, n):
    got = bytearray()
    while len(got) < n:
        c = s.recv(min(n - len(got), 1 << 20))
        if not c:
            raise SystemExit("unexpected EOF")
        got += c
    return bytes(got)


def echo(port, n=500, size=64):
    # Several sequential connections, then round trips, then a bulk transfer.
    for i in range(3):
        s = connect(port)
        s.sendall(b"conn %d" % i)
        assert recv_exact(s, len(b"conn %d" % i)) == b"conn %d" % i
        s.close()
    s = connect(port)
    t = time.time()
    for i in range(n):
        m = bytes((i + j) & 0xFF for j in range(size))
        s.sendall(m)
        assert recv_exact(s, size) == m, "echo mismatch"
    rt = (time.time() - t) / n
    blob = os.urandom(4 << 20)
    res = []
    th = threading.Thread(target=lambda: res.append(recv_exact(s, len(blob))))
    t = time.time()
    th.start()
    s.sendall(blob)
    th.join(60)
    dt = time.time() - t
    assert res and res[0] == blob, "bulk echo mismatch"
    s.close()
    print(f"NETTEST echo ok: 3 connections, {n} round trips of {size} B, "
          f"{rt * 1e6:.0f} us/rt; 4 MiB bulk echo {4 / dt:.1f} MiB/s")


def concurrent(port, k=3):
    ss = [connect(port) for _ in range(k)]
    for r in range(20):
        for i, s in enumerate(ss):
            s.sendall(b"c%d r%d;" % (i, r))
        for i, s in enumerate(ss):
            m = b"c%d r%d;" % (i, r)
            assert recv_exact(s, len(m)) == m
    for s in ss:
        s.close()
    print(f"NETTEST concurrent ok: {k} echo connections interleaved")


def stream(port, mib=16):
    s = connect(port)
    want = mib << 20
    t = time.time()
    buf = recv_exact(s, want)
    dt = time.time() - t
    vals = struct.unpack("<%dQ" % (want // 8), buf)
    bad = next((i for i, v in enumerate(vals) if v != i), None)
    assert bad is None, f"stream mismatch at counter {bad}: {vals[bad]:#x}"
    s.close()
    # A second connection starts at 0 again.
    s = connect(port)
    assert struct.unpack("<4Q", recv_exact(s, 32)) == (0, 1, 2, 3)
    s.close()
    print(f"NETTEST stream ok: {mib} MiB of counters in {dt * 1000:.0f} ms "
          f"({mib / dt:.1f} MiB/s)")


def discard(port, mib=4):
    s = connect(port)
    t = time.time()
    s.sendall(b"\0" * (mib << 20))
    s.shutdown(socket.SHUT_WR)
    s.settimeout(20)
    assert s.recv(1) == b""  # the guest closes after our FIN
    dt = time.time() - t
    s.close()
    print(f"NETTEST discard ok: {mib} MiB in {dt * 1000:.0f} ms ({mib / dt:.1f} MiB/s)")


def hmp(cmd):
    path = os.environ["QEMU_MONITOR"]
    m = socket.socket(socket.AF_UNIX)
    m.connect(path)
    m.settimeout(5)
    time.sleep(0.2)
    m.recv(4096)  # banner + prompt
    m.sendall(cmd.encode() + b"\n")
    time.sleep(0.2)
    m.close()


def pause(ep, sp, secs=3.0):
    """Pause the vCPUs (HMP stop/cont) with an echo and a stream connection
    open; both must carry on afterwards (smoltcp retransmits)."""
    e = connect(ep)
    s = connect(sp)
    e.sendall(b"before")
    assert recv_exact(e, 6) == b"before"
    first = recv_exact(s, 1 << 20)
    hmp("stop")
    e.sendall(b"during pause")
    time.sleep(secs)
    hmp("cont")
    t = time.time()
    assert recv_exact(e, 12) == b"during pause"
    resume = time.time() - t
    rest = recv_exact(s, 7 << 20)
    buf = first + rest
    vals = struct.unpack("<%dQ" % (len(buf) // 8), buf)
    bad = next((i for i, v in enumerate(vals) if v != i), None)
    assert bad is None, f"stream mismatch after pause at counter {bad}"
    e.close()
    s.close()
    print(f"NETTEST pause ok: {secs:.0f} s stop/cont, echo answered {resume * 1000:.0f} ms "
          "after cont, 8 MiB stream intact")


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    ep = int(os.environ.get("ECHO_PORT", 15007))
    sp = int(os.environ.get("STREAM_PORT", 15019))
    dp = int(os.environ.get("DISCARD_PORT", 15009))
    if what in ("echo", "all"):
        echo(ep)
    if what in ("conc", "all"):
        concurrent(ep)
    if what in ("stream", "all"):
        stream(sp, mib)
    if what in ("discard", "all"):
        discard(dp)
    if what == "pause":
        pause(ep, sp)


if __name__ == "__main__":
    main()
