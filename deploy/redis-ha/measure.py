#!/usr/bin/env python3
"""Measures failovers of the loopback cluster of scripts/redis-ha (the figures in README.md).

Not a test and not the project's load generator: the evidence behind the recipe, kept so the
figures can be reproduced. Only the standard library.

    deploy/redis-ha/measure.py DIR {kill|pause|cut} [--runs N] [--clients C] [--hold S]

DIR holds a cluster started with `scripts/redis-ha up DIR`. Each run: C clients write through
HAProxy (INCR hits, then WAIT 1 250 on the same connection; a write is *acknowledged* when WAIT
says a replica has it); the current primary P is faulted:
  kill   SIGKILL, started again with its AOF once writes succeed on another node
  pause  SIGSTOP for --hold s (default 4), then SIGCONT
  cut    cut off from the other nodes and the Sentinels, not from HAProxy, for --hold s
         (default 12), then healed
and the load goes on 12 s more. Each connection asks the node it reached for its address
(CONFIG GET bind), so every reply is attributed to a node. Per run, one JSON line:
  outage_s         fault -> first write acknowledged on another node
  old_last_ok_s    fault -> last write the old primary accepted (null: none)
  old_ok, old_acked   writes the old primary accepted / acknowledged after the fault
  back_writes      writes the old primary accepted after it came back (restart, SIGCONT, heal)
  back_conns       connections HAProxy gave the old primary after it came back
  acked, lost_acked   acknowledged writes / of them, those whose number was later handed out
                   again (the write vanished in the failover)
  lost_unacked     accepted but unacknowledged writes whose number was handed out again
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "scripts", "redis-ha")
WAIT_MS = 250
OP_TIMEOUT_S = 1.0
# Each client pauses this long between writes: ~400 writes/s each, enough to time a failover to
# a few milliseconds without taking the machine's cores from everything else.
PACE_S = 0.002


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    """One RESP2 connection; every reply is read with OP_TIMEOUT_S."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=OP_TIMEOUT_S)
        self.buf = b""

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data.decode()
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise ValueError("cannot parse reply %r" % line)

    def call(self, *args):
        self.sock.sendall(encode(*args))
        return self.reply()

    def close(self):
        self.sock.close()


class Client(threading.Thread):
    def __init__(self, port, events, stop):
        super().__init__(daemon=True)
        self.port, self.events, self.stop = port, events, stop

    def run(self):
        while not self.stop.is_set():
            try:
                c = Conn("127.0.0.1", self.port)
                node = c.call("CONFIG", "GET", "bind")[1]
                self.events.append((time.monotonic(), "conn", node, None, None))
            except Exception:
                time.sleep(0.01)
                continue
            try:
                while not self.stop.is_set():
                    t = time.monotonic()
                    value = c.call("INCR", "hits")
                    try:
                        replicas = c.call("WAIT", 1, WAIT_MS)
                    except Exception:
                        replicas = -1
                    self.events.append((t, "ok", node, value, replicas))
                    time.sleep(PACE_S)
            except Exception as e:
                self.events.append((time.monotonic(), "err", node, None, str(e)[:40]))
            finally:
                c.close()
            time.sleep(0.01)


def redis_ha(*args):
    return subprocess.run([SCRIPT, *args], check=True, capture_output=True, text=True).stdout.strip()


def host_of(node):
    return {"n1": "127.0.0.2", "n2": "127.0.0.3", "n3": "127.0.0.4"}[node]


def get_hits(port):
    c = Conn("127.0.0.1", port)
    try:
        return int(c.call("GET", "hits") or 0)
    finally:
        c.close()


def one_run(args, port):
    redis_ha("wait-ready", args.dir, "60")
    primary = redis_ha("primary", args.dir)
    old = host_of(primary)
    start_value = get_hits(port)
    events, stop = [], threading.Event()
    clients = [Client(port, events, stop) for _ in range(args.clients)]
    for c in clients:
        c.start()
    time.sleep(2)
    t_fault = time.monotonic()
    if args.fault == "kill":
        redis_ha("kill", args.dir, primary)
        deadline = t_fault + 30
        while time.monotonic() < deadline and not any(
            e[0] > t_fault and e[1] == "ok" and e[2] != old and e[4] >= 1 for e in list(events)
        ):
            time.sleep(0.05)
        time.sleep(args.restart_after)
        redis_ha("start", args.dir, primary)
    elif args.fault == "pause":
        redis_ha("pause", args.dir, primary)
        time.sleep(args.hold)
        redis_ha("resume", args.dir, primary)
    else:
        redis_ha("cut", args.dir, primary)
        time.sleep(args.hold)
        redis_ha("heal", args.dir)
    t_back = time.monotonic()
    time.sleep(12)
    stop.set()
    for c in clients:
        c.join(5)
    redis_ha("wait-ready", args.dir, "60")
    final = get_hits(port)

    ev = sorted(events)
    after = [e for e in ev if e[0] > t_fault]
    new_ok = [e for e in after if e[1] == "ok" and e[2] != old and e[4] >= 1]
    old_ok = [e for e in after if e[1] == "ok" and e[2] == old and e[0] < t_back]
    oks = [e for e in ev if e[1] == "ok"]
    seen = {}
    for e in oks:
        seen.setdefault(e[3], []).append(e)
    # A number handed out twice: the earlier write was lost (the counter went back).
    lost = [min(v)[0:5] for v in seen.values() if len(v) > 1]
    lost_acked = sum(1 for e in lost if e[4] >= 1)
    return {
        "fault": args.fault,
        "primary": primary,
        "new_primary": redis_ha("primary", args.dir),
        "outage_s": round(new_ok[0][0] - t_fault, 3) if new_ok else None,
        "old_last_ok_s": round(old_ok[-1][0] - t_fault, 3) if old_ok else None,
        "old_ok": len(old_ok),
        "old_acked": sum(1 for e in old_ok if e[4] >= 1),
        "back_writes": sum(1 for e in ev if e[0] > t_back and e[1] == "ok" and e[2] == old),
        "back_conns": sum(1 for e in ev if e[0] > t_back and e[1] == "conn" and e[2] == old),
        "writes": len(oks),
        "acked": sum(1 for e in oks if e[4] >= 1),
        "lost_acked": lost_acked,
        "lost_unacked": len(lost) - lost_acked,
        "final_minus_start": final - start_value,
        "max_acked_le_final": all(e[3] <= final for e in oks if e[4] >= 1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("fault", choices=["kill", "pause", "cut"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--hold", type=float, default=None)
    p.add_argument("--restart-after", type=float, default=1.0)
    args = p.parse_args()
    if args.hold is None:
        args.hold = {"kill": 0, "pause": 4, "cut": 12}[args.fault]
    env = dict(line.strip().split("=", 1) for line in open(os.path.join(args.dir, "cluster.env")) if "=" in line)
    port = int(env["HAPROXY_PORT"])
    results = []
    for _ in range(args.runs):
        r = one_run(args, port)
        results.append(r)
        print(json.dumps(r), flush=True)
    outages = sorted(r["outage_s"] for r in results if r["outage_s"] is not None)
    if outages:
        print(json.dumps({
            "fault": args.fault, "runs": len(results),
            "outage_median_s": outages[len(outages) // 2], "outage_worst_s": outages[-1],
            "old_last_ok_worst_s": max((r["old_last_ok_s"] or 0) for r in results),
            "back_writes": sum(r["back_writes"] for r in results),
            "lost_acked": sum(r["lost_acked"] for r in results),
        }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
