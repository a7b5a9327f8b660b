"""A Jepsen-style "lock-set" worker (run as its own process by ``test_jepsen.py``).

Loop: take the lock on ``ledger`` through the service, read the shared counter from the
resource with the fencing token, write counter + 1 with the same token, release. With
``--pause-after-read`` the first round prints ``HOLD <token>`` and waits before writing,
so the test can SIGSTOP it past its lease. Prints one line per write: ``WRITE <token> <status>``.
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--service", required=True)
    p.add_argument("--resource", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--lease", type=float, default=0.5)
    p.add_argument("--pause-after-read", type=float, default=0.0)
    args = p.parse_args()
    with httpx.Client(timeout=30) as http:
        for i in range(args.iterations):
            r = http.post(f"{args.service}/api/lock/request", json={
                "device_name": "ledger", "lock_type": "QUEUE_EXECUTING", "user_id": args.name,
                "timeout": args.lease, "wait": 60})
            if r.status_code != 200:
                print("REFUSED", r.status_code, flush=True)
                continue
            key, token = r.json()["lock_key"], r.json()["token"]
            read = http.post(f"{args.resource}/read", json={"token": token})
            if read.status_code == 200:
                value = read.json()["value"]
                if args.pause_after_read and i == 0:
                    print("HOLD", token, flush=True)
                    time.sleep(args.pause_after_read)
                w = http.post(f"{args.resource}/write", json={"token": token, "value": value + 1})
                print("WRITE", token, w.status_code, flush=True)
            else:
                print("STALE-READ", token, flush=True)
            http.post(f"{args.service}/api/lock/release", json={"lock_key": key})
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
