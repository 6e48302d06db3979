"""``ssh -R`` with OpenSSH on loopback, for comparison with the raw forward.

A private ``sshd`` runs on a loopback port with a host key, an authorized
key and a config file of its own in the run's temporary directory; no system
file is read or changed (``/run/sshd``, the privilege separation directory
sshd insists on, is created empty if missing). ``ssh -R 0:TARGET`` then asks
sshd to pick the forwarded port and reports it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional

from .procs import BenchError, Proc, free_port

__all__ = ["SSHReverseForward", "sshd_path"]


def sshd_path() -> Optional[str]:
    """The sshd binary, if OpenSSH's server is installed."""
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class SSHReverseForward:
    """A private sshd plus ``ssh -R 0:127.0.0.1:<target_port>``.

    :meth:`start` blocks until the forward is up (or raises
    :class:`BenchError`); :attr:`port` is then the forwarded port on loopback.
    """

    def __init__(self, work_dir: str, target_port: int, cipher: Optional[str] = None) -> None:
        self.dir = os.path.join(work_dir, "ssh")
        self.target_port = target_port
        self.cipher = cipher
        self.port = 0
        self.procs: List[Proc] = []

    def start(self) -> int:
        sshd = sshd_path()
        ssh = shutil.which("ssh")
        keygen = shutil.which("ssh-keygen")
        if not (sshd and ssh and keygen):
            raise BenchError("OpenSSH (sshd, ssh, ssh-keygen) is not installed")
        os.makedirs(self.dir, exist_ok=True)
        host_key = os.path.join(self.dir, "host_ed25519")
        user_key = os.path.join(self.dir, "user_ed25519")
        for key in (host_key, user_key):
            if not os.path.exists(key):
                subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", key], check=True,
                               capture_output=True, timeout=30)
        authorized = os.path.join(self.dir, "authorized_keys")
        shutil.copyfile(user_key + ".pub", authorized)
        os.chmod(authorized, 0o600)
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        last_error: Optional[BaseException] = None
        for _attempt in range(3):  # sshd cannot bind port 0: retry on a collision
            port = free_port()
            config = os.path.join(self.dir, "sshd_config")
            with open(config, "w") as handle:
                handle.write(
                    f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
                    f"AuthorizedKeysFile {authorized}\nPidFile {os.path.join(self.dir, 'sshd.pid')}\n"
                    "UsePAM no\nStrictModes no\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                    "AllowTcpForwarding yes\nGatewayPorts no\nPrintMotd no\nLogLevel ERROR\n"
                )
            daemon = Proc("sshd", [sshd, "-D", "-e", "-f", config], self.dir)
            self.procs.append(daemon)
            try:
                self._wait_listening(daemon, port)
            except BenchError as exc:
                last_error = exc
                daemon.stop()
                self.procs.remove(daemon)
                continue
            argv = [ssh, "-N", "-T", "-i", user_key, "-p", str(port),
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=INFO",
                    "-o", "IdentitiesOnly=yes", "-F", "/dev/null",
                    "-R", f"0:127.0.0.1:{self.target_port}"]
            if self.cipher:
                argv[1:1] = ["-c", self.cipher]
            argv.append(f"{os.environ.get('USER') or 'root'}@127.0.0.1")
            client = Proc("ssh", argv, self.dir)
            self.procs.append(client)
            match = client.wait_for_log(r"Allocated port (\d+)", timeout=20)[0]
            self.port = int(match.group(1))
            return self.port
        raise BenchError(f"sshd did not start: {last_error}")

    @staticmethod
    def _wait_listening(daemon: Proc, port: int) -> None:
        import socket
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not daemon.alive():
                raise BenchError(f"sshd exited: {daemon.tail()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError("sshd did not listen")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
