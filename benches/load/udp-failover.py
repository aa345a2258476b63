#!/usr/bin/env python3
"""UDP failover through meshgate (passive health): 20 clients, each from its own port, send a
datagram every 20 ms for 4 s to a round-robin service with two UDP echo endpoints
(`meshgate-echo --udp`); after 1 s one endpoint is killed (SIGKILL). Prints what was lost before
and after the kill, per client, and how many clients still got answers at the end.
Loopback only (ports BASE_PORT..BASE_PORT+2), every process killed on exit, bounded in time.
Usage: benches/load/udp-failover.py MESHGATE_BIN ECHO_BIN BASE_PORT
  e.g. benches/load/udp-failover.py target/release/meshgate target/release/meshgate-echo 28100"""
import os, shutil, signal, socket, subprocess, sys, tempfile, time
mg_bin, echo_bin, base = sys.argv[1], sys.argv[2], int(sys.argv[3])
e1, e2, port = base + 1, base + 2, base
tmp = tempfile.mkdtemp()
cfg = os.path.join(tmp, "m.yaml")
open(cfg, "w").write(f"""log: {{level: warn}}
admin: {{enabled: false}}
providers: {{file: {{watch: false}}}}
services:
  u:
    ports: ["127.0.0.1:{port}:53/udp"]
    policy: round_robin
    endpoints: ["127.0.0.1:{e1}", "127.0.0.1:{e2}"]
""")
procs = []
def start(args):
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); procs.append(p); return p
try:
    b1 = start([echo_bin, "--name", "e1", "--udp", f"127.0.0.1:{e1}"])
    start([echo_bin, "--name", "e2", "--udp", f"127.0.0.1:{e2}"])
    start([mg_bin, "run", "--config", cfg])
    time.sleep(1.0)
    clients = []
    for i in range(20):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.1", port)); s.setblocking(False); clients.append(s)
    sent = [dict() for _ in clients]   # seq -> phase
    got = [set() for _ in clients]
    last_reply = [0.0] * len(clients)
    t0 = time.monotonic(); seq = 0; killed_at = None
    while time.monotonic() - t0 < 4.0:
        now = time.monotonic()
        if killed_at is None and now - t0 >= 1.0:
            b1.send_signal(signal.SIGKILL); b1.wait(); killed_at = now
        phase = 0 if killed_at is None else 1
        for i, s in enumerate(clients):
            try: s.send(b"%d %d" % (i, seq)); sent[i][seq] = phase
            except OSError: pass
        seq += 1
        end = time.monotonic() + 0.02
        while time.monotonic() < end:
            for i, s in enumerate(clients):
                while True:
                    try: data = s.recv(100)
                    except (BlockingIOError, ConnectionRefusedError): break
                    got[i].add(int(data.split()[1])); last_reply[i] = time.monotonic()
            time.sleep(0.002)
    time.sleep(0.2)
    for i, s in enumerate(clients):
        while True:
            try: got[i].add(int(s.recv(100).split()[1]))
            except (BlockingIOError, ConnectionRefusedError): break
    before = sum(1 for i in range(len(clients)) for q, ph in sent[i].items() if ph == 0)
    lost_before = sum(1 for i in range(len(clients)) for q, ph in sent[i].items() if ph == 0 and q not in got[i])
    per_client = [sum(1 for q, ph in sent[i].items() if ph == 1 and q not in got[i]) for i in range(len(clients))]
    after = sum(1 for i in range(len(clients)) for q, ph in sent[i].items() if ph == 1)
    end_ok = sum(1 for i in range(len(clients)) if time.monotonic() - last_reply[i] < 0.5)
    hit = [n for n in per_client if n > 0]
    print(f"{os.path.basename(mg_bin)}: before kill {before} sent, {lost_before} lost; after kill {after} sent, "
          f"{sum(per_client)} lost by {len(hit)} clients (per client {sorted(hit)}); "
          f"clients answered in the last 0.5 s: {end_ok}/{len(clients)}")
finally:
    for p in procs:
        try: p.kill(); p.wait()
        except Exception: pass
    shutil.rmtree(tmp, ignore_errors=True)
