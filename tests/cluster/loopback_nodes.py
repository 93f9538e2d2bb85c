"""Two "servers" on one machine for `ray up`'s on-premise provider: one sshd per loopback address.

Each node is an sshd listening on its own loopback address (127.0.0.2, 127.0.0.3) on a spare
port, started by the test with a throwaway host key and client key. Ray has no SSH port setting
(and drops ``auth.ssh_proxy_command`` from the config it gives the head's autoscaler), so the
port reaches every ssh and rsync through an ``ssh`` first on the PATH of "the laptop" (the test)
and of the nodes that runs ``/usr/bin/ssh -F <the test's ssh_config>``: what ``~/.ssh/config``
does on real machines (ssh reads that from the passwd entry, not ``$HOME``, so it cannot be
faked per node). What makes two nodes of one machine behave like two servers:

- Its own process namespace (``unshare --pid --mount-proc``, sshd as PID 1): the config's
  ``ray stop`` on one node sees only that node's processes, as on a separate machine, and
  stopping the sshd ends everything started through it (the kernel kills a PID namespace with
  its first process), so nothing outlives the test even when it fails half-way.
- Its own home (sshd's ``SetEnv HOME``): ``~`` in the cluster config (file mounts, the wheel, the
  bootstrap files) and in the Serve config (the adapter disk cache) is per node.
- Its own Python: a venv that sees the test venv's packages (torch, ray) through a ``.pth`` line
  but not its editable install of this project, so the config's ``pip install`` of the wheel
  lands in the node and the replicas import the wheel, as on a server.
- Its own Ray temp dir (``RAY_TMPDIR`` in the node's ``~/.bashrc``, which Ray sources), for
  what ``ray start``/``ray stop`` keep outside a session. The session folder (logs, sockets) of a
  worker node is still the head's: Ray hands it out through the GCS, and ``--temp-dir`` on the
  worker made its raylet wait in vain for the dashboard agent's port file there (Ray 2.60).

Ports are the caller's business (two raylets on one host must not share any).
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Nothing the nodes run may phone home or reach a package index.
NODE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "PIP_NO_INDEX": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


@dataclass
class Node:
    name: str
    ip: str
    root: Path  # everything of this node lives under it
    process: subprocess.Popen | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def venv(self) -> Path:
        return self.root / "venv"


class LoopbackNodes:
    """sshd per node, a client key, and the ssh options that reach them (also as a ProxyCommand)."""

    def __init__(self, workdir: Path, ips: dict[str, str], port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.key = workdir / "id_ed25519"
        self.nodes = {name: Node(name, ip, workdir / name) for name, ip in ips.items()}

    @property
    def bin(self) -> Path:
        """Where the ``ssh`` with the test's port and host-key settings lives (first on PATH)."""
        return self.workdir / "bin"

    def start(self) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.workdir / "host_key")])
        hosts = " ".join(node.ip for node in self.nodes.values())
        settings = [
            f"Port {self.port}",
            "StrictHostKeyChecking no",
            f"UserKnownHostsFile {os.devnull}",
            "LogLevel ERROR",
        ]
        (self.workdir / "ssh_config").write_text(f"Host {hosts}\n" + "".join(f"  {line}\n" for line in settings))
        self.bin.mkdir()
        ssh = self.bin / "ssh"
        # ssh also expands "~/" in -i (~/ray_bootstrap_key.pem, which Ray writes into the head's
        # config) from the passwd entry; a node's ~ is its $HOME here. Other arguments may be the
        # remote command's (rsync's target path): those are left to the remote shell.
        ssh.write_text(
            "#!/bin/sh\n"
            """p=; for a do shift; case $p$a in -i'~/'*) a="$HOME/${a#'~/'}";; esac; p=$a; set -- "$@" "$a"; done\n"""
            f'exec /usr/bin/ssh -F {self.workdir / "ssh_config"} "$@"\n'
        )
        ssh.chmod(0o755)
        for node in self.nodes.values():
            self._provision(node)
            # unshare's own errors (e.g. no CAP_SYS_ADMIN for the namespaces) go to unshare.log.
            with (node.root / "unshare.log").open("wb") as errors:
                node.process = subprocess.Popen(
                    [
                        "unshare",
                        "--pid",
                        "--fork",
                        "--mount-proc",
                        "--kill-child",
                        str(SSHD),
                        "-D",
                        "-E",
                        str(node.root / "sshd.log"),
                        "-f",
                        str(node.root / "sshd_config"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call, before any test thread exists
                )
        for node in self.nodes.values():
            deadline = time.monotonic() + 30
            while self.ssh(node.name, "true", timeout=10, check=False).returncode != 0:
                assert node.process.poll() is None, f"sshd of {node.name} exited: {_logs(node)}"
                assert time.monotonic() < deadline, f"sshd of {node.name} never answered: {_logs(node)}"
                time.sleep(0.3)

    def _provision(self, node: Node) -> None:
        """What a server has before `ray up`: a home, a Python with ray and torch, a shell profile."""
        node.home.mkdir(parents=True)
        _run([sys.executable, "-m", "venv", "--without-pip", str(node.venv)])
        site = node.venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        (site / "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        python = node.venv / "bin" / "python"
        for tool, module in (("pip", "pip"), ("ray", "ray.scripts.scripts")):
            shim = node.venv / "bin" / tool
            shim.write_text(f'#!/bin/sh\nexec {python} -m {module} "$@"\n')
            shim.chmod(0o755)
        env = {**NODE_ENV, "RAY_TMPDIR": str(node.root / "t")}
        (node.root / "t").mkdir()
        profile = [f"export PATH={node.venv / 'bin'}:{self.bin}:$PATH"] + [
            f"export {k}={shlex.quote(v)}" for k, v in env.items()
        ]
        (node.home / ".bashrc").write_text("\n".join(profile) + "\n")
        (node.root / "sshd_config").write_text(
            "\n".join(
                [
                    f"ListenAddress {node.ip}:{self.port}",
                    f"HostKey {self.workdir / 'host_key'}",
                    "PidFile none",  # its pid would be 1, in its own namespace
                    f"AuthorizedKeysFile {self.key}.pub",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "MaxStartups 50",
                    "MaxSessions 50",
                    f"SetEnv HOME={node.home}",
                ]
            )
            + "\n"
        )

    def ssh(self, name: str, command: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``command`` on a node in a login shell with the node's profile, as Ray's updater does."""
        remote = f"bash --login -c {shlex.quote('source ~/.bashrc && ' + command)}"
        done = subprocess.run(
            [
                str(self.bin / "ssh"),
                "-i",
                str(self.key),
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                f"root@{self.nodes[name].ip}",
                remote,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"{name}: {command}\n{done.stdout}\n{done.stderr}"
        return done

    def processes(self, name: str) -> dict[int, str]:
        """pid -> command line of every process started through this node's sshd (its HOME)."""
        marker = f"HOME={self.nodes[name].home}".encode()
        return {pid: cmd for pid, cmd, env in _all_processes() if marker in env.split(b"\0")}

    def stop(self) -> None:
        """Stop every node: SIGKILL to ``unshare`` (with ``--fork`` it ignores SIGTERM), whose
        ``--kill-child`` kills the sshd, the namespace's PID 1, and the kernel the rest of it."""
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
        for node in self.nodes.values():
            if node.process is not None:
                node.process.wait(timeout=30)

    def leftovers(self) -> dict[int, str]:
        """Processes anywhere on the machine that still refer to this test's work dir."""
        marker = str(self.workdir).encode()
        return {
            pid: cmd
            for pid, cmd, env in _all_processes()
            if pid != os.getpid() and (marker in cmd.encode() or marker in env)
        }

    def kill_leftovers(self, timeout: float = 15) -> None:
        """The laptop side's ssh multiplexers (ControlPersist) and relays: ended by pid, TERM then KILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.leftovers():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout / 2
            while self.leftovers() and time.monotonic() < deadline:
                time.sleep(0.2)


def _logs(node: Node) -> str:
    return " | ".join(
        p.read_text(errors="replace") for p in (node.root / "unshare.log", node.root / "sshd.log") if p.exists()
    )


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the test process dies, even if that is killed
    outright (no finalizer runs then), so the node's namespace goes with it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _all_processes() -> list[tuple[int, str, bytes]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            env = (entry / "environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append((int(entry.name), cmd, env))
    return found


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
