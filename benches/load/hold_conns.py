#!/usr/bin/env python3
"""Hold N idle client connections open through a proxy and report the proxy's RSS.

Used by benches/load/run.sh (memory scenario). Python stdlib only.

Each connection makes one exchange so the proxy has really set it up (HTTP mode: one
keep-alive GET and its full response; TCP mode: one byte echoed back by the backend), then
stays idle. RSS (VmRSS, summed over the given PIDs and their children) is read before, while
all N are held, and some seconds after they are all closed, to see whether memory goes back.

Output: one line `before_kib held_kib after_kib opened per_conn_bytes`.
Every wait is bounded; the script exits non-zero if fewer than 95% of the connections open.
"""

import argparse
import os
import socket
import sys
import time


def tree(pids):
    """The PIDs and all their descendants (nginx/nsd style process trees)."""
    seen, todo = [], list(pids)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return seen


def rss_kib(pids):
    total = 0
    for p in tree(pids):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def read_http_response(s, deadline):
    """Read one HTTP/1.1 response with a Content-Length body (what the bench backend sends)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline:
            raise TimeoutError("response head")
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        if time.monotonic() > deadline:
            raise TimeoutError("response body")
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before response body")
        body += chunk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--mode", choices=["http", "tcp"], required=True)
    ap.add_argument("--pid", type=int, action="append", required=True)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="bound on the opening phase")
    a = ap.parse_args()

    time.sleep(a.settle)
    before = rss_kib(a.pid)
    socks = []
    deadline = time.monotonic() + a.timeout
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    failures = 0
    consecutive = 0
    for _ in range(a.n):
        if time.monotonic() > deadline:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5.0)
        try:
            s.connect(("127.0.0.1", a.port))
            if a.mode == "http":
                s.sendall(req)
                read_http_response(s, time.monotonic() + 5.0)
            else:
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    raise ConnectionError("no echo")
            socks.append(s)
            consecutive = 0
        except (OSError, TimeoutError, ConnectionError) as e:
            failures += 1
            consecutive += 1
            s.close()
            # The proxy stopped accepting (e.g. out of fds): stop instead of timing out each one.
            if failures > a.n // 20 or consecutive >= 5:
                print(f"too many failures ({failures}), last: {e}", file=sys.stderr)
                break
    time.sleep(a.settle)
    held = rss_kib(a.pid)
    opened = len(socks)
    for s in socks:
        s.close()
    socks.clear()
    time.sleep(a.settle * 2)
    after = rss_kib(a.pid)
    per_conn = (held - before) * 1024 / opened if opened else 0
    print(f"{before} {held} {after} {opened} {per_conn:.0f}")
    if opened < a.n * 0.95:
        print(f"only {opened}/{a.n} connections opened", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
