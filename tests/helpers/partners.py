"""Partner stores driven through the real CLI: ``Store`` (made by ``bpfs init --json``), ``Server``
(``bpfs serve``), ``Owner`` (a mounted store whose daemon replicates), ``StoreFactory`` (behind the
``stores`` fixture); pairing, recovery, data carrying the plaintext ``MARKER``, waiting, and
running a misbehaving partner written in Python."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import trio

from tests.helpers.cli import PYTHON, bpfs_env, run_bpfs
from tests.helpers.files import pack_files, sha256_file
from tests.helpers.mounts import Mount, read_daemon_json
from tests.helpers.netlab import run_cmd
from tests.helpers.procs import kill_pid, pid_alive, pids_mentioning, thread_states, wait_until

MiB = 1 << 20

MARKER = b"PARTNER-PLAINTEXT-MARKER-7f3a9c"


class Store:
    """A store created by `bpfs init --json`: path, peer id, recovery secret."""

    def __init__(self, path: Path, env=None):
        self.path = Path(path)
        self.env = env or bpfs_env()
        cp = run_bpfs("init", self.path, "--kdf", "interactive", "--json", env=self.env)
        info = json.loads(cp.stdout)
        self.peer_id: str = info["peer_id"]
        self.recovery_secret: str = info["recovery_secret"]

    def bpfs(self, cmd, *args, check=True, timeout=120, env=None):
        return run_bpfs(cmd, self.path, *args, env=env or self.env, check=check, timeout=timeout)

    def id_json(self) -> dict:
        return json.loads(self.bpfs("id", "--json").stdout)

    def address(self) -> str:
        """The address its daemon listens on (from `bpfs id --json`)."""
        addrs = self.id_json().get("addresses") or []
        assert addrs, f"`bpfs id {self.path} --json` lists no address: is its daemon listening?"
        return addrs[0]

    def status(self) -> dict:
        return json.loads(self.bpfs("status", "--json").stdout)

    def peers(self) -> list[dict]:
        return json.loads(self.bpfs("peers", "--json").stdout)

    def peer(self, peer_id: str) -> dict:
        rows = [r for r in self.peers() if r["peer_id"] == peer_id]
        assert rows, f"{self.path}: `bpfs peers --json` does not list {peer_id}: {self.peers()}"
        return rows[0]

    def partner_status(self, peer_id: str) -> dict:
        st = self.status()
        rows = [p for p in st["partners"] if p["peer_id"] == peer_id]
        assert rows, f"{self.path}: `bpfs status --json` does not list {peer_id}: {st}"
        return rows[0]

    def sent_bytes(self, peer_id: str) -> int:
        return int(self.partner_status(peer_id)["sent_bytes"])

    def sync(self, timeout: float = 180, check=True):
        return self.bpfs("sync", "--timeout", str(timeout), check=check, timeout=timeout + 60)

    def daemon_pid(self) -> int:
        return int(read_daemon_json(self.path)["pid"])

    def log_tail(self, n: int = 40) -> str:
        out = []
        for p in sorted(self.path.glob("log/*.log")):
            lines = p.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {p} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def hosted_dir(self, owner_id: str) -> Path:
        return self.path / "hosted" / owner_id

    def hosted(self, owner_id: str) -> dict:
        """What this store holds for owner: bytes of complete packs, of partial uploads, of roots."""
        d = self.hosted_dir(owner_id)
        out = {"packs": 0, "pack_bytes": 0, "part_bytes": 0, "roots": 0, "root_bytes": 0, "held": 0}
        if not d.exists():
            return out
        for p in d.rglob("*"):
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            if not p.is_file():
                continue
            if p.name.endswith(".pack"):
                out["packs"] += 1
                out["pack_bytes"] += size
            elif p.name.endswith(".part") and "packs" in p.parts:
                out["part_bytes"] += size
            elif p.name.endswith(".root"):
                out["roots"] += 1
                out["root_bytes"] += size
        out["held"] = out["pack_bytes"] + out["part_bytes"]
        return out

    def hosted_packs(self, owner_id: str) -> dict[int, Path]:
        return {int(p.stem, 16): p for p in self.hosted_dir(owner_id).glob("packs/*/*.pack")}


class Server(Store):
    """A partner store run by `bpfs serve STORE --listen ...`."""

    def __init__(self, path, env=None, prefix=None):
        super().__init__(path, env)
        self.prefix = prefix or []  # e.g. a NetLab host's nsenter prefix
        self.listen: str | None = None

    def serve(self, listen: str = "127.0.0.1:0", timeout=60):
        self.listen = listen
        cmd = [*self.prefix, PYTHON, "-m", "bpfs", "serve", self.path, "--listen", listen]
        try:
            run_cmd(cmd, env=self.env, timeout=timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None
        assert pid_alive(self.daemon_pid())

    def stop(self):
        return self.bpfs("stop", check=False, timeout=60)

    def kill9(self) -> int:
        pid = self.daemon_pid()
        kill_pid(pid)
        assert not pid_alive(pid), f"daemon {pid} survived SIGKILL: {thread_states(pid)}"
        return pid

    def cleanup(self):
        try:
            if (self.path / "daemon.json").exists():
                self.stop()
        except Exception:  # noqa: BLE001
            pass
        for pid in pids_mentioning(str(self.path)):
            if pid != os.getpid():
                kill_pid(pid)


class Owner(Store):
    """A mounted store (the data owner) whose mount daemon also replicates."""

    def __init__(self, path, mnt, env=None):
        super().__init__(path, env)
        self.m = Mount(self.path, mnt, env=self.env)
        self.m.mnt.mkdir(parents=True, exist_ok=True)

    @property
    def mnt(self) -> Path:
        return self.m.mnt

    def mount(self, listen: str = "127.0.0.1:0"):
        return self.m.mount("--listen", listen)

    def umount(self):
        return self.m.umount()

    def cleanup(self):
        self.m.cleanup()


class StoreFactory:
    """Owners and servers in ``tmp_path`` (``store-NAME``, ``mnt-NAME``); ``cleanup()`` stops,
    unmounts and kills them all, newest first (the ``stores`` fixture)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = Path(tmp_path)
        self.made: list = []

    def owner(self, name="A", **kw) -> Owner:
        o = Owner(self.tmp_path / f"store-{name}", self.tmp_path / f"mnt-{name}", **kw)
        self.made.append(o)
        return o

    def server(self, name="B", **kw) -> Server:
        s = Server(self.tmp_path / f"store-{name}", **kw)
        self.made.append(s)
        return s

    def track(self, obj):
        self.made.append(obj)
        return obj

    def cleanup(self) -> None:
        for obj in reversed(self.made):
            obj.cleanup()


def pair(owner: Store, holder: Store, address: str | None = None, *, offer: str | None = None,
         ask: str | None = None, holder_offer: str | None = None, holder_ask: str | None = None) -> dict:
    """`bpfs pair HOLDER --accept OWNER` then `bpfs pair OWNER --direct HOLDER_ADDR --expect HOLDER`."""
    accept = ["--accept", owner.peer_id]
    if holder_offer:
        accept += ["--offer", holder_offer]
    if holder_ask:
        accept += ["--ask", holder_ask]
    holder.bpfs("pair", *accept)
    direct = ["--direct", address or holder.address(), "--expect", holder.peer_id, "--json"]
    if offer:
        direct += ["--offer", offer]
    if ask:
        direct += ["--ask", ask]
    cp = owner.bpfs("pair", *direct)
    return json.loads(cp.stdout)


def write_random(path: Path, size: int, seed: int, marker_every: int = 4 * MiB) -> None:
    """Incompressible data with MARKER every `marker_every` bytes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left, pos = size, 0
        while left:
            n = min(MiB, left)
            block = bytearray(rng.randbytes(n))
            if pos % marker_every == 0 and n > len(MARKER):
                block[:len(MARKER)] = MARKER
            f.write(block)
            left -= n
            pos += n


def owner_packs(owner: Store) -> dict[int, Path]:
    return {int(p.stem, 16): p for p in pack_files(owner.path)}


def assert_holds_all_packs(owner: Store, holder: Store):
    """Every pack the owner has (after a sync) is at the holder, byte for byte."""
    mine, theirs = owner_packs(owner), holder.hosted_packs(owner.peer_id)
    missing = sorted(set(mine) - set(theirs))
    assert not missing, f"{holder.path} lacks {len(missing)} of {len(mine)} packs of {owner.path}: {missing[:5]}"
    differ = [pid for pid in mine if sha256_file(mine[pid]) != sha256_file(theirs[pid])]
    assert not differ, f"packs differ between {owner.path} and {holder.path}: {differ[:5]}"
    assert holder.hosted(owner.peer_id)["roots"] >= 1, f"{holder.path} holds no root of {owner.path}"


def recover(target: Path, owner: Store, source_addr: str, source_id: str | None, *, check=True, timeout=600,
            kdf: str = "interactive"):
    env = bpfs_env(BPFS_RECOVERY=owner.recovery_secret)
    args = ["recover", target, "--from", source_addr, "--kdf", kdf]
    if source_id:
        args += ["--expect", source_id]
    return run_bpfs(*args, env=env, check=check, timeout=timeout)


def wait_for(pred, timeout: float, what: str, interval: float = 0.2, diag=lambda: ""):
    if not wait_until(pred, timeout=timeout, interval=interval):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{diag()}")


# ---- a misbehaving partner, in Python

def misbehaving_run(fn, *args, timeout: float = 60):
    """trio.run ``fn(*args)`` (a misbehaving partner's script), failing after ``timeout`` seconds."""
    async def main():
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(main)


def host_port(address: str):
    """("host", port) of "host:port" or "[v6]:port"."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
