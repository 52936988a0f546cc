"""A steady stream of chat requests, run in the client image (python3, standard library only) by
e2e/test_roll.py: `python3 -c <this file's text>` with URL and MODEL in the environment.

Two workers send requests back to back, each on a fresh connection (what a client sees of a roll, without
the question of how a pool reuses connections to a pod that is going away). The Service's name is resolved
once: the ClusterIP never changes, and a DNS hiccup on a loaded machine is not what this measures.
Progress (ok/failed counts) is rewritten to /tmp/progress after every request; after /tmp/stop appears,
the workers finish their request in flight and /tmp/result.json holds every failure and the latencies.
"""

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse

WORKERS = 2
TIMEOUT = 60.0

url = urllib.parse.urlsplit(os.environ["URL"])
address = socket.gethostbyname(url.hostname or "")
port = url.port or 80
body = json.dumps({"model": os.environ["MODEL"], "messages": [{"role": "user", "content": "ping"}],
                   "mock_response": "pong"})
headers = {"Content-Type": "application/json", "Host": url.netloc}
lock = threading.Lock()
latencies: list[float] = []
failures: list[dict[str, object]] = []


def write(path: str, data: object) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def one() -> None:
    began = time.monotonic()
    conn = http.client.HTTPConnection(address, port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/v1/chat/completions", body, headers)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        status, error = resp.status, ("" if resp.status == 200 and "pong" in text else text[:300])
    except Exception as err:  # every failure is a result, not a crash
        status, error = 0, repr(err)
    finally:
        conn.close()
    took = time.monotonic() - began
    with lock:
        if error:
            failures.append({"at": time.time(), "status": status, "error": error, "seconds": round(took, 3)})
        else:
            latencies.append(took)
        write("/tmp/progress", {"ok": len(latencies), "failed": len(failures)})


def worker() -> None:
    while not os.path.exists("/tmp/stop"):
        one()


threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
latencies.sort()
p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
write("/tmp/result.json", {"ok": len(latencies), "failures": failures, "p50": latencies[len(latencies) // 2]
                           if latencies else 0.0, "p99": p99, "max": latencies[-1] if latencies else 0.0})
time.sleep(3600)  # stay up so that the test can read the result
