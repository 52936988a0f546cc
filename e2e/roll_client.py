"""A steady stream of chat requests, run in the client image (python3, standard library only) by
e2e/test_roll.py: `python3 -c <this file's text>` with URL and MODEL in the environment.

Two workers send requests back to back, each on a fresh connection (what a client sees of a roll, without
the question of how a pool reuses connections to a pod that is going away). A third keeps one keep-alive
connection, as a pooled client (the openai SDK, httpx) does. Like those clients, this one sends again only
what provably never reached a server, once, on a new connection (counted in `retries`): a request whose
connection failed to open (fresh, or the kept one being opened again after the server closed it: nothing
was sent), and a request on the kept connection that the server had closed before any answer came. A
request that was sent and then failed, or a second failure, is a failure. The Service's name is resolved
once: the ClusterIP never changes, and a DNS hiccup on a loaded machine is not what this measures.
The stream starts once the Service has answered a first request: the ModelAPI is Ready as soon as its pod is,
and the node's kube-proxy writes the new endpoint's rules a little later (measured: 10-70 ms here, over a
second on a loaded machine), during which any client is refused; that is before the roll, not part of it
(those early attempts are counted in `before_first_answer`, not as failures).
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


retries = 0
# What the kept connection's peer closing it looks like, before any answer (safe to send again).
CLOSED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def send(conn: http.client.HTTPConnection) -> tuple[int, str]:
    conn.request("POST", "/v1/chat/completions", body, headers)
    resp = conn.getresponse()
    text = resp.read().decode(errors="replace")  # on `Connection: close`, http.client reconnects next time
    return resp.status, ("" if resp.status == 200 and "pong" in text else text[:300])


def opened(conn: http.client.HTTPConnection) -> http.client.HTTPConnection:
    """conn with its socket open: a new connection, or the kept one after the server closed it (http.client
    would open it inside `request`, where a failure to connect looks like any other error). A connect that
    fails sent nothing, so it is made once more."""
    global retries
    if conn.sock is not None:
        return conn
    try:
        conn.connect()
    except OSError:
        conn.close()
        with lock:
            retries += 1
        conn.connect()
    return conn


def one(conn: http.client.HTTPConnection | None) -> None:
    global retries
    began = time.monotonic()
    used = conn or http.client.HTTPConnection(address, port, timeout=TIMEOUT)
    try:
        try:
            status, error = send(opened(used))
        except CLOSED:
            if conn is None:
                raise
            conn.close()
            with lock:
                retries += 1
            status, error = send(opened(conn))
    except Exception as err:  # every failure is a result, not a crash
        status, error = 0, repr(err)
        used.close()
    finally:
        if conn is None:
            used.close()
    took = time.monotonic() - began
    with lock:
        if error:
            failures.append({"at": time.time(), "status": status, "error": error, "seconds": round(took, 3),
                             "pooled": conn is not None})
        else:
            latencies.append(took)
        write("/tmp/progress", {"ok": len(latencies), "failed": len(failures)})


def worker(pooled: bool) -> None:
    conn = http.client.HTTPConnection(address, port, timeout=TIMEOUT) if pooled else None
    while not os.path.exists("/tmp/stop"):
        one(conn)


def first_answer(deadline: float) -> int:
    """Send a request every 0.2 s until one gets a 200 (or the deadline passes); return how many did not."""
    attempts = 0
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(address, port, timeout=TIMEOUT)
        try:
            if send(conn)[0] == 200:
                return attempts
        except OSError:
            pass
        finally:
            conn.close()
        attempts += 1
        time.sleep(0.2)
    return attempts


before_first_answer = first_answer(time.monotonic() + 120)
threads = [threading.Thread(target=worker, args=(i == WORKERS,)) for i in range(WORKERS + 1)]
for t in threads:
    t.start()
for t in threads:
    t.join()
latencies.sort()


def quantile(q: float) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * q))] if latencies else 0.0


write("/tmp/result.json", {"ok": len(latencies), "failures": failures, "retries": retries, "p50": quantile(0.5),
                           "p99": quantile(0.99), "max": latencies[-1] if latencies else 0.0,
                           "before_first_answer": before_first_answer})
time.sleep(3600)  # stay up so that the test can read the result
