"""README's first command on a fresh data dir: `mergelab demo up` until the dashboard answers
(/_stcore/health), and until its default sweep is done, while `--burners` CPU-bound processes run.
Nothing is prepared: the demo family is built, the shipped rows loaded, the sweep run, as for a new
user. Prints the times and the load average.

    PYTHONPATH=. python bench/first_run.py [--burners 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).read() == b"ok"
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burners", type=int, default=2, help="competing CPU-bound processes")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    args = parser.parse_args()
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "MERGELAB_THREADS", "MERGELAB_DB", "MERGELAB_JOBS")}
        env["MERGELAB_HOME"] = home
        port = free_port()
        log = Path(home) / "demo-up.log"
        up = None
        try:
            time.sleep(5)
            print(f"{args.burners} CPU-bound processes on {len(os.sched_getaffinity(0))} cores; "
                  f"load average {os.getloadavg()[0]:.2f}")
            start = time.monotonic()
            with open(log, "wb") as out:
                up = subprocess.Popen([sys.executable, "-m", "mergelab", "demo", "up", "--port", str(port)], env=env,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            served = swept = None
            while time.monotonic() - start < args.timeout and up.poll() is None:
                now = time.monotonic() - start
                if served is None and answers(f"http://127.0.0.1:{port}/_stcore/health"):
                    served = now
                    print(f"dashboard answers after {served:.1f} s (load {os.getloadavg()[0]:.2f})")
                if served is not None and "sweep: job 1 done" in log.read_text(errors="replace"):
                    swept = now
                    print(f"default sweep done after {swept:.1f} s (load {os.getloadavg()[0]:.2f})")
                    break
                time.sleep(0.25)
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=120)
        finally:
            for proc in spinning:
                proc.kill()
            if up is not None and up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
        print("demo up said:")
        print("\n".join("  " + line for line in log.read_text(errors="replace").splitlines()
                        if not line.startswith(" ") and line.strip()))


if __name__ == "__main__":
    main()
