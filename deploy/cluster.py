"""Redis + N gemma-sessions replicas + nginx on this machine, for trying scale-out and for the tests and the bench.

Contract: every process listens on 127.0.0.1 on its own port and writes only under the run directory (configs
rendered from deploy/redis.conf and deploy/nginx.conf, pid files, logs, nginx's temp paths, Redis's AOF); nothing
of the system's nginx or Redis is touched. ``stop()`` (and Ctrl-C on the command line) ends nginx, then the
replicas (gracefully: running turns may finish), then Redis (which fsyncs its AOF on SIGTERM).

    python deploy/cluster.py --replicas 2 --port 8080 --model gemma3-270m      # or: make cluster N=2

then, from Python::

    client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="-")
    conv = client.conversations.create()
    client.responses.create(model="gemma3-270m", conversation=conv.id, input="Hi",
                            extra_headers={"X-Session-Id": conv.id})

The classes are the tests' and the bench's harness too (tests/e2e/test_cluster.py, bench/cluster.py): each part can
be started, stopped, killed (SIGKILL) or paused on its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DEPLOY = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(template: Path, **values: str) -> str:
    """``template``'s text with each ``{{NAME}}`` replaced by ``values[NAME]``; every placeholder must be given."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    if "{{" in text:
        raise ValueError(f"{template}: a placeholder was left unfilled")
    return text


def find_binary(name: str) -> str:
    """A system binary (Debian puts nginx in /usr/sbin, often not on a user's PATH); `make system` installs them."""
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                       None)
    if found is None:
        raise FileNotFoundError(f"{name} not found: `make system` installs it (Debian package "
                                f"{'redis-server' if name == 'redis-server' else name})")
    return found


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} in {timeout:.0f} s")


class _Process:
    """One child process with its log file in the run directory."""

    def __init__(self, name: str, log: Path):
        self.name, self.log = name, log
        self.proc: subprocess.Popen | None = None

    def _spawn(self, cmd: list[str]) -> None:
        with open(self.log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # Ctrl-C in a terminal reaches us, not them

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed."""
        if self.alive:
            self.proc.kill()
            self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Graceful stop; SIGKILL after ``timeout`` seconds. Returns the exit status."""
        if self.alive:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return None if self.proc is None else self.proc.returncode

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class Redis(_Process):
    """redis-server with deploy/redis.conf (AOF, fsync always) on ``port``, its data in ``run/redis``."""

    def __init__(self, run: Path, port: int | None = None, maxmemory: str = "0"):
        self.dir = run / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        super().__init__("redis", self.dir / "redis-stdout.log")
        self.port, self.maxmemory = port or free_port(), maxmemory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        conf = self.dir / "redis.conf"
        conf.write_text(render(DEPLOY / "redis.conf", PORT=str(self.port), DIR=str(self.dir),
                               MAXMEMORY=self.maxmemory))
        self._spawn([find_binary("redis-server"), str(conf)])
        _wait_port(self.port, self.proc, "redis-server")
        deadline = time.monotonic() + 30  # loading a large AOF: port open, LOADING errors until done
        while self._ping() != b"+PONG" and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def _ping(self) -> bytes:
        return self._command(b"PING")

    def _command(self, command: bytes) -> bytes:
        """One inline command's one-line reply (b"" when Redis cannot be reached)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(command + b"\r\n")
                return s.recv(64).strip()
        except OSError:
            return b""

    def dbsize(self) -> int:
        reply = self._command(b"DBSIZE")
        if not reply.startswith(b":"):
            raise RuntimeError(f"redis-server: DBSIZE answered {reply!r}")
        return int(reply[1:])


class Replica(_Process):
    """One `gemma-sessions serve` process named ``name`` on ``port`` over the store ``store``."""

    def __init__(self, run: Path, name: str, store: str, model: str, port: int | None = None,
                 extra: list[str] | None = None):
        super().__init__(name, run / f"{name}.log")
        self.port, self.store, self.model, self.extra = port or free_port(), store, model, list(extra or [])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "gemma_sessions.cli", "serve", "--model", self.model, "--store", self.store,
                "--host", "127.0.0.1", "--port", str(self.port), "--replica-name", self.name, *self.extra]

    def start(self, wait: bool = True, timeout: float = 300.0) -> Replica:
        self._spawn(self.command)
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"replica {self.name} exited with status {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"replica {self.name} not healthy in {timeout:.0f} s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int | None:
        return super().stop(sig, timeout)


class Nginx(_Process):
    """nginx with deploy/nginx.conf in front of ``replicas`` on ``port`` (never the system's nginx or its files)."""

    def __init__(self, run: Path, replicas: list[Replica], port: int | None = None, workers: int = 1,
                 fail_timeout_s: int = 2):
        self.dir = run / "nginx"
        (self.dir / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        super().__init__("nginx", self.dir / "nginx-stdout.log")
        self.replicas, self.port, self.workers = replicas, port or free_port(), workers
        self.fail_timeout_s = fail_timeout_s

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        servers = "\n".join(f"        server 127.0.0.1:{r.port} max_fails=1 fail_timeout={self.fail_timeout_s}s;"
                            for r in self.replicas)
        # NOTE: as root, nginx's workers would run as `nobody`, who cannot enter a private run directory.
        user = "user root;" if os.geteuid() == 0 else ""
        conf = self.dir / "nginx.conf"
        conf.write_text(render(DEPLOY / "nginx.conf", USER=user, WORKERS=str(self.workers), RUN=str(self.dir),
                               SERVERS=servers, LISTEN=f"127.0.0.1:{self.port}"))
        self._spawn([find_binary("nginx"), "-p", str(self.dir), "-c", str(conf), "-e",
                     str(self.dir / "nginx-error.log"), "-g", "daemon off;"])
        _wait_port(self.port, self.proc, "nginx")
        return self

    def stop(self, sig: int = signal.SIGQUIT, timeout: float = 10.0) -> int | None:
        return super().stop(sig, timeout)  # SIGQUIT: graceful (open streams finish); SIGKILL after timeout


class Cluster:
    """Redis, ``n`` replicas (r1..rN) over it, nginx in front; a context manager that stops them all.

    Example::

        with Cluster(Path("run"), n=2, model="gemma3-270m") as c:
            httpx.get(c.url + "/health").headers["x-replica"]   # 'r1' or 'r2'
    """

    def __init__(self, run: Path, n: int = 2, model: str = "gemma3-270m", port: int | None = None,
                 serve_args: list[str] | None = None, redis_maxmemory: str = "0", nginx_workers: int = 1):
        self.run = Path(run)
        self.run.mkdir(parents=True, exist_ok=True)
        self.redis = Redis(self.run, maxmemory=redis_maxmemory)
        self.replicas = [Replica(self.run, f"r{i + 1}", self.redis.url, model, extra=serve_args) for i in range(n)]
        self.nginx = Nginx(self.run, self.replicas, port, workers=nginx_workers)

    @property
    def url(self) -> str:
        return self.nginx.url

    def start(self) -> Cluster:
        try:
            self.redis.start()
            for r in self.replicas:  # all loading at once: the model load is the long part
                r.start(wait=False)
            for r in self.replicas:
                r.wait_healthy()
            self.nginx.start()
        except BaseException:
            self.stop()
            raise
        return self

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def wait_kv_written(self, replica: Replica, quiet_s: float = 0.3, timeout: float = 300.0) -> None:
        """Until ``replica``'s turn-end KV is in Redis: its /metrics show no snapshot queued or pending and Redis's
        key count has not changed for ``quiet_s`` (a snapshot being written has left the queue already)."""
        names = ("gemma_store_queued_exports", "gemma_store_pending_snapshots")
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            lines = httpx.get(f"{replica.url}/metrics", timeout=30).text.splitlines()
            values = [float(line.split()[-1]) for line in lines if line.split(" ")[0] in names]
            size = self.redis.dbsize()
            if size != last or len(values) != len(names) or any(values):
                last, since = size, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{replica.name}: KV snapshots still being written after {timeout:.0f} s")

    def stop(self) -> None:
        self.nginx.stop()
        for r in self.replicas:
            r.send(signal.SIGINT)  # all drain at once, then each is waited for
        for r in self.replicas:
            r.stop()
        self.redis.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="arguments after -- go to every `gemma-sessions serve`")
    p.add_argument("--replicas", "-n", type=int, default=2)
    p.add_argument("--port", type=int, default=8080, help="nginx's port (the one clients use)")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--run-dir", default=None, help="where configs, logs and Redis's AOF go (default: a temp dir)")
    p.add_argument("--redis-maxmemory", default="0", help="Redis maxmemory (KV blobs are evicted beyond it; 0: none)")
    p.add_argument("--nginx-workers", type=int, default=1)
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    run = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="gemma-cluster-"))

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C, and SIGTERM / SIGHUP from a supervisor, all stop the cluster cleanly (SIGINT explicitly: a shell starts
    # background jobs with it ignored)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    cluster = Cluster(run, args.replicas, args.model, args.port, serve_args, args.redis_maxmemory,
                      args.nginx_workers)
    print(f"starting redis + {args.replicas} replicas + nginx in {run} ...", flush=True)
    try:
        cluster.start()
        print(f"redis   {cluster.redis.url}")
        for r in cluster.replicas:
            print(f"{r.name:7s} {r.url}  (log {r.log})")
        print(f"nginx   {cluster.url}  <- clients; send X-Session-Id: <conversation id>\nCtrl-C stops them all",
              flush=True)
        while all(x.alive for x in (cluster.redis, cluster.nginx)):
            time.sleep(0.5)
        print("redis or nginx exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
