"""Recovery: rebuilding a whole store from its partners with the recovery secret.

Owns `bpfs recover NEW_STORE [--from HOST:PORT]... [--expect PEER_ID] [--at SNAPSHOT] [--list]
[--broker HOST[:PORT]]...`: the order of the steps, what is written where, what the user is
told (`Console`: lines, warnings, one progress line), and how a failed or interrupted run ends.
Reaching partners is `sources`'; which root to recover and which partners count as ours is
`roots`'; moving and checking packs is `fetcher`'s; rebuilding an index from a root and retaining
a root are `snapshot`'s.

Steps (the recovery secret derives every key, so the new store has the same peer id and its
partners recognise it):
  1. find: every partner the recovery can reach (`--from` addresses, broker beacons) lists the
     roots it holds for us; the newest root of each is fetched and opened (it must be signed by
     our key and its manifest must open with our keys). The newest valid root is taken, or the
     one `--at` names (a generation, or a snapshot's name as `.snapshots/` shows it). One warning
     line per partner serving an older newest root than another (what a rollback looks like), per
     root that does not verify, per partner that cannot be reached. The root's manifest lists the
     store's partners: those not reached yet are dialled too (addresses, pair keys). Nothing is
     written until this step found a valid root: then the new store (new passphrase) and the
     state (STORE/recovery.json; the verified roots in STORE/recovery/).
  2. metadata: the metadata packs of that root and of every older valid root the partners hold
     and have not released (the history) are fetched, every chunk authenticated, and the index is
     rebuilt from them on this machine.
  3. data: every data pack the snapshot needs, from whichever partner has it, several partners
     and several packs per partner at once; each checked against the tree root the rebuilt index
     records and chunk by chunk before it counts. (Older snapshots' data lives in these packs too:
     a retained snapshot's chunks stay in the newest snapshot's record stream, see `history`.)
  4. finish: the history is adopted (`snapshot.adopt_root`: `.snapshots/` shows it again), packs
     older snapshots name that the rebuilt index lacks get tombstones (partners release them once
     nothing retained needs them), the packs are queued for replication (partners confirm they
     hold them), the generation counter is set above every root a partner holds (so the next
     snapshot outranks them, after `--at` too), and every partner the manifest lists (and any other
     that served us) goes into the ledger with its quotas, pair key and beacon slot, and what it
     holds (by digest) is marked as held.

Resuming and failing: each step records its end in STORE/recovery.json; running the same command
again continues (a pack half fetched continues from its size). An interruption (Ctrl-C, partners
that stay unreachable) ends with one line and exit status 130 or 1, leaving that state. A run that
fails before it found a valid root (wrong secret, no partner holds our roots, a wrong `--expect`)
has written nothing; one whose snapshot cannot be rebuilt (its metadata cannot be had intact)
removes the store it created. A store folder holding a fresh, unused store of this identity (an
interrupted creation) is used again. Packs held only by partners that cannot be reached stop the
run (exit 1, "run the same command again"); packs no reached partner can give intact (damaged or
lost everywhere) do not: the recovery finishes, names the files it could not restore, exits 1.

`--list` is a recovery drill: it reaches the partners the same way and shows, per partner, the
snapshots it can serve (generation, name, time, files, bytes, whether each verifies); it writes
nothing.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import trio

from ..config import DEFAULT_BROKERS, ConfigError, brokers_from_env, format_size, parse_broker, parse_brokers
from ..errors import BpfsError, first_error
from ..fsutil import fsync_dir, make_private_dir, write_private_file
from ..history import snapshot_name, snapshot_names
from ..keyfile import KeyRing, read_public
from ..net.quic import TransportConfig, open_endpoint
from ..net.rpc import RemoteError
from ..passphrase import read_passphrase
from ..store import key_path
from . import protocol as P
from .fetcher import Fetcher, Job
from .protocol import PARTNER_IDLE_TIMEOUT
from .roots import (OpenedRoot, RecoveryError, RootBook, holders_of, keep_proven, newest_root, no_partner, parse_at,
                    partner_rows, root_at, warn_disagreement)
from .sources import Finder, Lookups, Source, SourceDown, SourceGone

STATE_FILE = "recovery.json"
ROOTS_DIR = "recovery"
ENV_SECRET = "BPFS_RECOVERY"
STATE_VERSION = 2
LIST_WAIT = 8.0  # seconds listed partners get to answer when another one serves us already


# ----- what the user sees ------------------------------------------------------------------------
class Console:
    """What a recovery tells its user on stderr: lines, warnings, and one progress line.

    On a terminal the progress line updates in place (carriage return, then erase to the end of
    the line), cut to the terminal's width so that it never wraps (a wrapped line would leave a
    new line per update); otherwise a progress line is printed at most every PLAIN_INTERVAL
    seconds (a forced one, a phase starting or ending, at once), never the same line twice in a
    row. `quiet` (--json) drops lines and progress, not warnings.
    Attributes: warnings (every warning given, for the JSON result)."""

    TTY_INTERVAL = 0.5
    PLAIN_INTERVAL = 5.0

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.warnings: list[str] = []
        self._shown = 0  # width of the progress line on screen (tty)
        self._last = 0.0
        self._last_text = ""  # the progress line shown last (not repeated)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def clear(self) -> None:
        if self._shown:
            self._write("\r\x1b[K")
            self._shown = 0
            self._last_text = ""

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        return columns or shutil.get_terminal_size().columns  # $COLUMNS, else 80

    def say(self, line: str) -> None:
        if not self.quiet:
            self.clear()
            self._write(line + "\n")

    def warn(self, line: str) -> None:
        self.warnings.append(line)
        self.clear()
        self._write(f"warning: {line}\n")

    def progress(self, text: str, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if text == self._last_text or (not force and now - self._last < (self.TTY_INTERVAL if self.tty
                                                                           else self.PLAIN_INTERVAL)):
            return
        self._last, self._last_text = now, text
        if self.tty:
            width = max(1, self._width() - 1)  # the last column would wrap on some terminals
            shown = text if len(text) <= width else text[:max(0, width - 3)] + "..."
            self._write("\r" + shown + "\x1b[K")
            self._shown = len(shown)
        else:
            self._write(text + "\n")


class Meter:
    """Bytes moved against a total: rate over the last few seconds, and an estimate."""

    WINDOW = 8.0

    def __init__(self, console: Console, what: str, total: int, sources: int):
        self.console, self.what, self.total, self.sources = console, what, total, sources
        self.done = 0
        self.started = time.monotonic()
        self._samples: list[tuple[float, int]] = [(self.started, 0)]

    def start(self, done: int) -> None:
        """Bytes there already (partial packs an earlier run left)."""
        self.done = done
        self._samples = [(time.monotonic(), done)]

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.WINDOW:
            self._samples.pop(0)
        self.console.progress(self.line())

    def rate(self) -> float:
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = max(0, self.total - self.done)
        eta = (f", about {_duration(left / rate)} left" if left / rate >= 0.5 else ", under a second left") \
            if rate > 0 and left else ""
        return (f"{self.what}: {format_size(self.done)} of {format_size(self.total)} ({pct:.0f} %), "
                f"{rate / 1e6:.1f} MB/s{eta}, {self.sources} partner{'s' if self.sources != 1 else ''}")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# ----- inputs -------------------------------------------------------------------------------------
def _secret() -> str:
    text = os.environ.get(ENV_SECRET)
    if text:
        return text
    if not sys.stdin.isatty():
        raise RecoveryError(f"no recovery secret: set {ENV_SECRET} or run on a terminal", exit_code=2)
    return getpass.getpass("Recovery secret: ")


def _keys() -> KeyRing:
    try:
        return KeyRing.from_recovery_secret(_secret())
    except BpfsError:
        raise
    except Exception as e:  # a mistyped secret: its check characters say so
        raise RecoveryError(f"not a recovery secret: {e}", exit_code=2) from None


def _check_froms(froms) -> list[str]:
    from .sources import split_host_port

    for text in froms:
        try:
            split_host_port(text)
        except ValueError:
            raise RecoveryError(f"--from {text!r}: expected HOST:PORT (a name or an IP address, e.g. "
                                "192.0.2.7:7450)", exit_code=2) from None
    return list(froms)


def _brokers(given) -> list:
    try:
        if given:
            return parse_brokers(list(given))
        return brokers_from_env([parse_broker(b) for b in DEFAULT_BROKERS])
    except ConfigError as e:
        raise RecoveryError(str(e), exit_code=2) from None


# ----- state ---------------------------------------------------------------------------------------
def _state_path(store: str) -> str:
    return os.path.join(store, STATE_FILE)


def _roots_dir(store: str) -> str:
    return os.path.join(store, ROOTS_DIR)


def _load_state(store: str) -> dict | None:
    try:
        with open(_state_path(store)) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        raise RecoveryError(f"{_state_path(store)} is unreadable: remove {store} and recover again") from None
    if state.get("version") != STATE_VERSION:
        raise RecoveryError(f"{store} holds a recovery begun by another version of bpfs: remove it and recover "
                            "again", exit_code=2)
    return state


def _save_state(store: str, state: dict) -> None:
    write_private_file(_state_path(store), json.dumps(state).encode())
    fsync_dir(store)


def _save_root(store: str, root: OpenedRoot) -> None:
    make_private_dir(_roots_dir(store))
    write_private_file(os.path.join(_roots_dir(store), f"{root.generation:016x}.root"), root.blob)


def _load_root(store: str, keys, generation: int) -> OpenedRoot:
    from ..snapshot import SnapshotError, open_manifest

    path = os.path.join(_roots_dir(store), f"{generation:016x}.root")
    try:
        with open(path, "rb") as f:
            blob = f.read()
        manifest = open_manifest(keys, blob)
    except (OSError, SnapshotError) as e:
        raise RecoveryError(f"the recovery state in {store} is damaged ({e}): remove {store} and recover again") \
            from None
    return OpenedRoot(generation, P.object_digest(blob), blob, manifest)


def _fresh_store(store: str, keys) -> bool:
    """Whether `store` holds a freshly created store (nothing but its root directory)."""
    import itertools

    from ..index import ROOT_INO, TABLES, Index, u64

    try:
        index = Index(os.path.join(store, "index"), keys, readonly=True)
    except Exception:  # noqa: BLE001 - no usable index: not a fresh store of ours
        return False
    try:
        with index.read_view() as records:
            inodes = list(itertools.islice((k for k, _ in records("inodes")), 2))
            busy = [t for t in TABLES if t not in ("meta", "inodes") and next(records(t), None) is not None]
        return inodes == [u64(ROOT_INO)] and not busy
    except Exception:  # noqa: BLE001
        return False
    finally:
        index.close()


def _rebuilt_generation(store: str) -> int:
    """The index's generation counter (plain), read without keys; 0 if unreadable."""
    import lmdb

    try:
        env = lmdb.open(os.path.join(store, "index"), readonly=True, lock=False, max_dbs=32, subdir=True)
    except lmdb.Error:
        return 0
    try:
        with env.begin() as txn:
            raw = txn.get(b"generation", db=env.open_db(b"meta", txn=txn, create=False))
        return int.from_bytes(raw, "big") if raw else 0
    except lmdb.Error:
        return 0
    finally:
        env.close()


# ----- the run --------------------------------------------------------------------------------------
@dataclass
class Plan:
    """One `bpfs recover` run's inputs."""

    store: str
    froms: list[str]
    expect: str | None
    at: tuple | None
    brokers: list
    kdf: str = "moderate"
    passphrase: bytes | None = None


def recover(store: str, froms, expect: str | None, kdf: str, passphrase_file: str | None, *, at: str | None = None,
            brokers=(), console: Console | None = None) -> dict:
    """`bpfs recover`: see the module docstring. Returns the summary (JSON-able)."""
    console = console or Console(quiet=True)
    plan = Plan(os.path.abspath(store), _check_froms(froms or []), expect, parse_at(at), _brokers(brokers), kdf)
    if plan.expect and len(plan.froms) != 1:
        raise RecoveryError("--expect needs exactly one --from (the partner it names)", exit_code=2)
    keys = _keys()
    state = _load_state(plan.store) if os.path.isdir(plan.store) else None
    if os.path.exists(key_path(plan.store)):
        if read_public(key_path(plan.store)).get("public_key") != keys.identity.public_key.hex():
            raise RecoveryError(f"{plan.store} holds another store (not the one of this recovery secret)", exit_code=2)
        if state is None and not _fresh_store(plan.store, keys):
            raise RecoveryError(f"{plan.store} already holds this store and no recovery is in progress there: "
                                "recover into a new folder", exit_code=2)
    elif os.path.exists(plan.store) and (not os.path.isdir(plan.store) or os.listdir(plan.store)):
        raise RecoveryError(f"{plan.store} is not empty: recover into a new or empty folder", exit_code=2)
    if state is None and not os.path.exists(key_path(plan.store)):
        plan.passphrase = read_passphrase(passphrase_file, confirm=True)  # asked before anything is done
    if state is not None and plan.at is not None:
        console.warn(f"a recovery of generation {state['generation']} is in progress in {plan.store}: "
                     "continuing it (--at is ignored)")
    run = _Run(plan, keys, console, state)
    run.here_before = _pack_files(os.path.join(plan.store, "packs"), parts=True)[1] if state is not None else 0
    started = time.monotonic()
    try:
        try:
            result = trio.run(run.main)
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
    except KeyboardInterrupt:
        console.clear()
        raise RecoveryError(run.interrupted_message(), exit_code=130) from None
    except Exception as e:
        console.clear()
        run.remove_if_useless(e)
        raise
    console.clear()
    result["seconds"] = round(time.monotonic() - started, 3)
    result["summary"] = run.summary_line(result)
    result["warnings"] = console.warnings
    return result


def unrestored_error(result: dict) -> RecoveryError | None:
    """The error to end with when the recovery finished without some files (None: it has all)."""
    n, missing = len(result.get("unrestored") or []), result.get("missing") or {}
    if not missing:
        return None
    first = min(missing)
    more = f" and {_count(len(missing) - 1, 'more pack')}" if len(missing) > 1 else ""
    return RecoveryError(f"{_count(n, 'file')} could not be restored: pack {first} is damaged or missing at every "
                         f"partner ({missing[first]}){more}; those files read as errors and `bpfs verify` names "
                         "them", exit_code=1)


class _Run:
    """One run of `recover` inside trio (see the module docstring for the steps)."""

    def __init__(self, plan: Plan, keys, console: Console, state: dict | None):
        self.plan, self.keys, self.console, self.state = plan, keys, console, state
        self.store = plan.store
        self.fetched_bytes = 0  # this run
        self.fetched_packs = 0
        self.here_before = 0  # bytes of packs (whole and partial) an earlier run left (set by `recover`)
        self.used: set[str] = set()  # partners we received bytes from this run
        self._finder: Finder | None = None  # see `finder`
        self.started = time.monotonic()
        self.phase = "find"
        self._unreached: list[str] = []  # listed partners that could not be reached
        self.created: str | None = None  # "folder" or "store": what this run created (removed if useless)
        self.timings: dict[str, float] = {}  # step -> seconds (this run)
        self._lap_at = time.monotonic()

    @property
    def finder(self) -> Finder:
        """The partners found (set up by `main`, which every step runs inside)."""
        if self._finder is None:
            raise RuntimeError("the Finder exists only while main() runs")
        return self._finder

    @property
    def _state(self) -> dict:
        """`state`, once the recovery has one (a run that continues one, or `_create`): every step
        after finding partners."""
        if self.state is None:
            raise RuntimeError("no recovery state yet")
        return self.state

    def _lap(self, step: str) -> None:
        now = time.monotonic()
        self.timings[step] = round(now - self._lap_at, 3)
        self._lap_at = now

    def remove_if_useless(self, error: BaseException) -> None:
        """A store this run created whose recovery failed for good before its index was rebuilt is
        removed (a retry, maybe with --at an older snapshot, starts afresh); an interruption or an
        unreachable partner leaves it to continue from."""
        if self.created is None or self.state is None or self.state.get("phase") != "meta" \
                or getattr(error, "transient", False):
            return
        if self.created == "folder":
            shutil.rmtree(self.store, ignore_errors=True)
        else:
            for name in os.listdir(self.store):
                path = os.path.join(self.store, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
        self.console.say(f"removed {self.store}: nothing was recovered")

    # ----- messages ---------------------------------------------------------------------------------
    def interrupted_message(self) -> str:
        if self.state is None:
            return "recovery interrupted before anything was written"
        done = format_size(self.state.get("fetched_bytes", 0))
        return (f"recovery interrupted ({self.phase}; {done} fetched so far): run the same command again to "
                "continue")

    def summary_line(self, result: dict) -> str:
        """The packs recovered (all runs together) = fetched now + already here (an earlier run);
        what was received now is named apart when it differs (copies that failed their check, or
        came twice, are received and not kept)."""
        seconds = max(result["seconds"], 1e-3)
        now, received = result["fetched_now_bytes"], result["bytes_this_run"]
        got = (f"{format_size(now)} of them fetched now, {format_size(result['already_here_bytes'])} already here"
               if result["already_here_bytes"] else "all fetched now")
        return (f"Recovered {self.store}: snapshot generation {result['generation']} ({result['snapshot']}), "
                f"{format_size(result['set_bytes'])} in {_count(result['set_packs'], 'pack')}, {got}"
                + (f" ({format_size(received)} received)" if format_size(received) != format_size(now) else "")
                + f", from {_count(len(result['partners']), 'partner')} in {seconds:.1f} s "
                f"({received / seconds / 1e6:.1f} MB/s)"
                + (f"; {_count(len(result['history']), 'older snapshot')} kept" if result["history"] else ""))

    # ----- main -----------------------------------------------------------------------------------------
    async def main(self) -> dict:
        host = "::" if self.plan.froms and ":" in self.plan.froms[0].rsplit(":", 1)[0] else "0.0.0.0"
        config = TransportConfig(max_data=32 << 20, max_stream_data=8 << 20, socket_buffer=8 << 20,
                                 idle_timeout=PARTNER_IDLE_TIMEOUT)
        async with open_endpoint(self.keys.identity, host, 0, config=config, listen=False) as ep:
            async with trio.open_nursery() as nursery:
                lookups = Lookups(ep, self.plan.brokers, nursery) if self.plan.brokers else None
                self._finder = Finder(self.keys, ep, lookups, nursery, warn=self.console.warn)
                try:
                    return await self._steps()
                finally:
                    self.finder.close()
                    nursery.cancel_scope.cancel()

    async def _steps(self) -> dict:
        finder, console = self.finder, self.console
        console.progress("looking for partners...", force=True)
        await finder.find(self.plan.froms, self.plan.expect)
        book = RootBook(self.keys, console.warn)
        if self.state is None:
            chosen = await self._choose(book)
            keep_proven(finder, set(book.opened), chosen, console.warn)
            history = await self._history(book, chosen)
            self._create(chosen, history)
        else:
            chosen = _load_root(self.store, self.keys, self.state["generation"])
            history = [_load_root(self.store, self.keys, g) for g in self.state["history"]]
            await self._more_partners(chosen)
            keep_proven(finder, {(r.generation, r.digest) for r in [chosen, *history]}, chosen, console.warn)
            if not finder.live():
                raise no_partner(finder, "holds our data")
            console.say(f"continuing the recovery of snapshot generation {chosen.generation} "
                        f"({snapshot_name(chosen.manifest.created_ns)}) in {self.store}")
        self._note_unreached(chosen)
        for s in finder.live():
            if s.usage is not None:
                self._state["floor"] = max(self._state.get("floor", 0), s.usage.highest_pack)
            for row in s.roots.values():
                self._state["top_generation"] = max(self._state.get("top_generation", 0), row.generation)
        _save_state(self.store, self._state)
        self._lap("find")
        if self._state["phase"] == "meta":
            self.phase = "fetching snapshot metadata"
            history = await self._metadata(chosen, history)
            self._lap("metadata")
            await self._rebuild(chosen)
            self._lap("rebuild")
        if self._state["phase"] == "data":
            self.phase = "fetching data"
            missing = await self._data(chosen)
            self._lap("data")
            self.phase = "finishing"
            result = self._finish(chosen, history, missing)
            self._lap("finish")
            result["phases"] = self.timings
            return result
        raise RecoveryError(f"the recovery state in {self.store} names an unknown step: remove {self.store} and "
                            "recover again")

    async def _more_partners(self, chosen: OpenedRoot) -> list[Source]:
        """Reach the partners the root's manifest lists (those not reached yet). A partner already
        serves us, so those that do not answer within LIST_WAIT seconds are left out."""
        rows = partner_rows(chosen.manifest)
        new = await self.finder.add_partner_list(rows, LIST_WAIT if self.finder.live() else None) if rows else []
        if new:
            self.console.say(f"found {len(new)} more partner{'s' if len(new) != 1 else ''} in the snapshot's "
                             f"partner list: {', '.join(s.peer_id for s in new)}")
        return new

    async def _choose(self, book: RootBook) -> OpenedRoot:
        """The root to recover: the newest valid one any partner holds (partner lists followed until
        they name nobody new), or the one --at names. Warns where partners disagree."""
        newest = await newest_root(self.finder, book)
        while await self._more_partners(newest):
            newest = await newest_root(self.finder, book)
        chosen = newest
        if self.plan.at is not None:
            holders, rows = holders_of(self.finder.live())
            chosen = await root_at(book, holders, rows, self.plan.at)
        warn_disagreement(self.finder.live(), newest, self.console.warn)
        if chosen is not newest:
            self.console.say(f"recovering the older snapshot generation {chosen.generation} as --at asks (the newest "
                             f"is generation {newest.generation})")
        return chosen

    def _note_unreached(self, chosen: OpenedRoot) -> None:
        reached = set(self.finder.sources)
        for row in partner_rows(chosen.manifest):
            if row["peer_id"] not in reached and row["peer_id"] != self.keys.identity.peer_id:
                self._unreached.append(row["peer_id"])
                why = self.finder.why.get(row["peer_id"], "not tried")
                self.console.warn(f"partner {row['peer_id']} (at {row.get('address') or row.get('observed') or '?'}) "
                                  f"could not be reached ({why}): recovering from the others")

    async def _history(self, book: RootBook, chosen: OpenedRoot) -> list[OpenedRoot]:
        """Every older valid root the partners hold and have not released (one per generation)."""
        holders, rows = holders_of(self.finder.live())
        wanted = {k: v for k, v in holders.items() if k[0] < chosen.generation}
        if wanted:
            self.console.progress(f"checking {len(wanted)} older snapshots...", force=True)
            await book.open_many(wanted, rows)
        out: dict[int, OpenedRoot] = {}
        for (gen, _digest), opened in sorted(book.opened.items()):
            if gen < chosen.generation and gen not in out:
                out[gen] = opened
        return [out[g] for g in sorted(out)]

    def _create(self, chosen: OpenedRoot, history: list[OpenedRoot]) -> None:
        from ..snapshot import create_store_from_recovery_secret

        if not os.path.exists(key_path(self.store)):
            self.created = "store" if os.path.isdir(self.store) else "folder"
            if self.plan.passphrase is None:  # `recover` asked for it: there was no store
                raise RuntimeError("no passphrase for the new store")
            create_store_from_recovery_secret(self.store, self.keys.recovery_secret, self.plan.passphrase,
                                              self.plan.kdf)
            self.console.say(f"created {self.store} for peer id {self.keys.identity.peer_id}")
        for root in [chosen, *history]:
            _save_root(self.store, root)
        self.state = {"version": STATE_VERSION, "phase": "meta", "generation": chosen.generation,
                      "history": [r.generation for r in history], "at": self.plan.at is not None,
                      "fetched_bytes": 0, "fetched_packs": 0, "floor": 0, "top_generation": 0,
                      "started": time.time()}
        _save_state(self.store, self.state)
        self.console.say(f"recovering snapshot generation {chosen.generation} "
                         f"({snapshot_name(chosen.manifest.created_ns)}, {chosen.manifest.files} files, "
                         f"{format_size(chosen.manifest.file_bytes)}) from "
                         f"{len(self.finder.live())} partner{'s' if len(self.finder.live()) != 1 else ''}"
                         + (f", with {_count(len(history), 'older snapshot')}" if history else ""))

    # ----- fetching -----------------------------------------------------------------------------------
    async def _listed(self) -> list[Source]:
        """The live partners, each with a fresh listing of the packs it holds."""
        async def one(s: Source):
            try:
                await s.list_packs()
            except RemoteError as e:
                self.console.warn(f"{s.peer_id} refused to list our packs: {e.message}")
                s.packs = None
            except (SourceDown, SourceGone) as e:
                self.console.warn(f"{s.peer_id}: {e}")
                s.packs = None

        async with trio.open_nursery() as nursery:
            for s in self.finder.live():
                nursery.start_soon(one, s)
        return [s for s in self.finder.live() if s.packs is not None]

    async def _fetch(self, what: str, jobs: list[Job], sources: list[Source]):
        from ..packs import PackFiles

        packs = PackFiles(self.store)
        listed = [s.packs for s in sources if s.packs is not None]  # (all of them: see `_listed`)
        total = sum(j.size if j.size is not None else max((held[j.pack_id][0] for held in listed
                                                           if j.pack_id in held), default=0) for j in jobs)
        meter = Meter(self.console, what, total, len(sources))
        fetcher = Fetcher(self.keys, jobs, sources, packs.path, progress=meter.add, warn=self.console.warn)
        meter.start(fetcher.result.present)
        try:
            result = await fetcher.run()
        finally:
            packs.close()
            res = fetcher.result
            self.fetched_bytes += res.bytes
            self.fetched_packs += len(res.done)
            self.used |= {p for p, n in res.by_source.items() if n}
            self._state["fetched_bytes"] = self._state.get("fetched_bytes", 0) + res.bytes
            self._state["fetched_packs"] = self._state.get("fetched_packs", 0) + len(res.done)
            _save_state(self.store, self._state)
        if total:
            self.console.progress(meter.line(), force=True)
            self.console.clear()
        return result

    def _stopped(self, packs: set, what: str) -> RecoveryError:
        n = len(packs)
        dead = [s for s in self.finder.sources.values() if s.dead]
        why = "; ".join(f"{s.peer_id}: {s.error}" for s in dead) or "; ".join(
            f"{p} not reached" for p in self._unreached) or "no partner holding them answered"
        err = RecoveryError(f"recovery stopped: {n} {what} pack{'s' if n != 1 else ''} could not be fetched, their "
                            f"partners are unreachable ({why[:400]}); run the same command again to continue")
        err.transient = True
        return err

    def _transient(self, result) -> set:
        """The failed packs a later run may get: their holders went away, or nobody reached holds
        them while a listed partner could not be reached."""
        out = set(result.unreachable)
        if self._unreached:
            out |= {pid for pid, why in result.failed.items() if why == "no partner we reached holds it"}
        return out

    async def _metadata(self, chosen: OpenedRoot, history: list[OpenedRoot]) -> list[OpenedRoot]:
        """Fetch the metadata packs of the chosen root and of its history; the history roots whose
        metadata could be fetched whole."""
        from ..packs import PackFiles

        entries: dict[int, dict] = {}
        for root in [chosen, *history]:
            for c in root.manifest.chunks:
                entries.setdefault(c.pack, {})[(c.chunk_id, c.offset)] = (c.chunk_id, c.offset, c.sealed_length,
                                                                          c.length)
        folder = PackFiles(self.store)
        jobs = [Job(pid, None, None, list(e.values())) for pid, e in sorted(entries.items())
                if not os.path.exists(folder.path(pid))]
        folder.close()
        if jobs:
            sources = await self._listed()
            result = await self._fetch("fetching snapshot metadata", jobs, sources)
            bad = set(result.failed)
            need = {c.pack for c in chosen.manifest.chunks}
            if bad & need:
                if bad & need & self._transient(result):
                    raise self._stopped(bad & need & self._transient(result), "metadata")
                pid = min(bad & need)
                raise RecoveryError(f"snapshot generation {chosen.generation} cannot be rebuilt: its metadata pack "
                                    f"{pid:012x} could not be had intact ({result.failed[pid]}); try --at an older "
                                    "snapshot (bpfs recover --list shows them)")
            kept = []
            for root in history:
                lost = bad & {c.pack for c in root.manifest.chunks}
                if lost:
                    self.console.warn(f"older snapshot generation {root.generation} is not kept: its metadata pack "
                                      f"{min(lost):012x} could not be had ({result.failed[min(lost)]})")
                else:
                    kept.append(root)
            if len(kept) != len(history):
                history = kept
                self._state["history"] = [r.generation for r in history]
                _save_state(self.store, self._state)
        return history

    async def _rebuild(self, chosen: OpenedRoot) -> None:
        from ..packs import PackFiles
        from ..snapshot import SnapshotError, local_fetcher, rebuild_index

        self.console.progress("rebuilding the index...", force=True)
        packs = PackFiles(self.store)
        floor = self._state.get("floor", 0)
        try:
            await trio.to_thread.run_sync(
                lambda: rebuild_index(self.store, self.keys, chosen.blob, local_fetcher(packs), pack_id_floor=floor))
        except SnapshotError as e:
            if not ("not freshly created" in str(e) and _rebuilt_generation(self.store) >= chosen.generation + 1):
                raise RecoveryError(f"the snapshot could not be rebuilt: {e}") from None
            # interrupted just after the rebuild: it is done
        finally:
            packs.close()
        self._state["phase"] = "data"
        _save_state(self.store, self._state)

    async def _data(self, chosen: OpenedRoot) -> dict[int, str]:
        """Fetch every data pack the snapshot needs; the packs that could not be had (-> why)."""
        from ..index import Index
        from ..packs import PackFiles
        from ..store import StoreLock

        lock = StoreLock(self.store)
        packs = PackFiles(self.store)
        index = Index(os.path.join(self.store, "index"), self.keys, readonly=True)
        try:
            jobs = []
            for pid in chosen.manifest.packs:
                if os.path.exists(packs.path(pid)):
                    continue
                known = index.get_pack_root(pid)
                rec = index.get_pack(pid)
                if known is not None:
                    root, size = known
                elif rec is not None:
                    root, size = None, rec.size
                else:
                    continue  # gone from the index since (a mount after an earlier run compacted it)

                def entries(pid=pid):
                    out = []
                    for cid in index.chunks_in_pack(pid):
                        c = index.get_chunk(cid)
                        if c is not None and c.pack == pid:
                            out.append((cid, c.offset, c.sealed_length, c.length))
                    return out

                jobs.append(Job(pid, size, root, entries))
            if not jobs:
                return {}
            sources = await self._listed()
            result = await self._fetch("fetching data", jobs, sources)
            if self._transient(result):
                raise self._stopped(self._transient(result), "data")
            return dict(result.failed)
        finally:
            index.close()
            packs.close()
            lock.release()

    # ----- finishing -------------------------------------------------------------------------------------
    def _finish(self, chosen: OpenedRoot, history: list[OpenedRoot], missing: dict[int, str]) -> dict:
        from ..index import Index
        from ..packs import PackFiles
        from ..snapshot import SnapshotError, adopt_root
        from ..store import StoreLock

        lock = StoreLock(self.store)
        packs = PackFiles(self.store)
        index = Index(os.path.join(self.store, "index"), self.keys)
        try:
            kept = []
            for root in [*history, chosen]:
                try:
                    adopt_root(index, self.keys, packs, root.blob)
                    if root is not chosen:
                        kept.append(root.generation)
                except SnapshotError as e:
                    if root is chosen:
                        raise RecoveryError(f"the recovered snapshot could not be retained: {e}") from None
                    self.console.warn(f"older snapshot generation {root.generation} is not kept: {e}")
            known = {pid for pid, _ in index.all_packs()}
            tombs = set()
            for root in history:
                tombs |= {pid for pid in root.manifest.packs if pid not in known}
            for pid in sorted(tombs):
                index.put_tombstone(pid, chosen.generation)
            for pid in chosen.manifest.packs:
                rec = index.get_pack(pid)
                if rec is not None and not rec.local and pid not in missing and os.path.exists(packs.path(pid)):
                    index.seal_pack(pid, rec)  # sealed, and in the outbox: partners confirm they hold it
            top = self._state.get("top_generation", 0)
            if index.generation <= top:  # our next snapshot must outrank every root a partner holds
                index.put_counter("generation", top + 1)
            roots = {}
            for s in self.finder.live():
                for pid in (s.packs or {}):
                    if pid not in roots:
                        roots[pid] = index.get_pack_root(pid)
            index.commit()
            unrestored = _files_using(index, set(missing)) if missing else []
        finally:
            index.close()
            packs.close()
            lock.release()
        adopted = {chosen.generation, *kept}
        partners = self._adopt_partners(chosen, adopted, roots, tombs)
        _remove_parts(os.path.join(self.store, "packs"))
        set_packs, set_bytes = _pack_files(os.path.join(self.store, "packs"), parts=False)
        already = min(self.here_before, set_bytes)
        self._state["phase"] = "done"
        shutil.rmtree(_roots_dir(self.store), ignore_errors=True)
        os.unlink(_state_path(self.store))
        fsync_dir(self.store)
        names = snapshot_names([(r.generation, r.manifest.created_ns) for r in [*history, chosen]])
        return {"store": self.store, "generation": chosen.generation, "snapshot": names[chosen.generation],
                "created": chosen.manifest.created_ns / 1e9, "files": chosen.manifest.files,
                "file_bytes": chosen.manifest.file_bytes, "history": sorted(kept),
                "packs_this_run": self.fetched_packs, "bytes_this_run": self.fetched_bytes,
                "packs": self._state.get("fetched_packs", 0), "bytes": self._state.get("fetched_bytes", 0),
                "set_packs": set_packs, "set_bytes": set_bytes, "fetched_now_bytes": set_bytes - already,
                "already_here_bytes": already,
                "partners": sorted(self.used), "known_partners": partners,
                "from": sorted(self.used)[0] if self.used else None, "tombstones": len(tombs),
                "missing": {f"{pid:012x}": why for pid, why in sorted(missing.items())}, "unrestored": unrestored}

    def _adopt_partners(self, chosen: OpenedRoot, adopted: set[int], roots: dict, tombs: set[int]) -> list[str]:
        """Every partner the manifest lists, and any other that served us, in the ledger; what
        each holds (by digest) marked as held, and the tombstoned packs it holds too (so that
        they are released there, not forgotten)."""
        from .ledger import Ledger, Partner

        rows = {r["peer_id"]: r for r in partner_rows(chosen.manifest) if r["peer_id"] != self.keys.identity.peer_id}
        reached = {s.peer_id: s for s in self.finder.live()}
        ledger = Ledger(self.store, self.keys)
        now = time.time()
        try:
            for peer in sorted(set(rows) | set(reached)):
                row, s = rows.get(peer, {}), reached.get(peer)
                if ledger.partner(peer) is None:
                    public_key = row.get("public_key") or (s.public_key if s else None)
                    if not public_key:
                        continue
                    quota = s.usage.quota if s is not None and s.usage is not None else 0
                    p = Partner(peer, public_key, row.get("address") or (_direct(s.address) if s else None),
                                we_keep=int(row.get("we_keep", quota)), they_keep=int(row.get("they_keep", quota)),
                                paired_at=float(row.get("paired_at") or now), observed=row.get("observed"),
                                pair_key=row.get("pair_key"))
                    if s is not None:
                        direct = _direct(s.address)
                        if direct and direct != p.address:
                            p.observed = direct
                        p.last_seen = now
                        if s.slot is not None:
                            p.beacon_slot, p.beacon_sent = s.slot, True
                        held = [g for g, r in s.roots.items() if g in adopted and not r.released]
                        if held:
                            p.root_generation = max(held)
                            p.root_created = s.roots[p.root_generation].created
                    ledger.put_partner(p)
                if s is not None:
                    if s.packs:
                        ledger.mark_sent(peer, P.PACK, [pid for pid, (size, digest) in s.packs.items()
                                                        if pid in tombs or (roots.get(pid) is not None
                                                                            and roots[pid][0] == digest)])
                    ledger.mark_sent(peer, P.ROOT, [g for g, r in s.roots.items() if g in adopted and not r.released])
        finally:
            ledger.close()
        return sorted(set(rows) | set(reached))


def _pack_files(folder: str, parts: bool) -> tuple[int, int]:
    """(count, bytes) of the whole pack files in a store's packs folder; with `parts`, partial ones
    (an interrupted fetch's) count too."""
    count = nbytes = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith(".pack") or (parts and ".pack.part" in name):
                try:
                    nbytes += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
                count += name.endswith(".pack")
    return count, nbytes


def _remove_parts(folder: str) -> None:
    """Partial pack files left in the packs folder (of packs that could not be had)."""
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if ".pack.part" in name:
                try:
                    os.unlink(os.path.join(dirpath, name))
                except FileNotFoundError:
                    pass


def _direct(address: str | None) -> str | None:
    return address if address and not address.startswith("relay") else None


def _files_using(index, pack_ids: set[int]) -> list[str]:
    """Paths of the files with data in these packs (every name of each), sorted."""
    import stat

    from ..index import ROOT_INO

    cids = set()
    for pid in pack_ids:
        cids.update(index.chunks_in_pack(pid))
    inos = {ino for ino, e in index.all_extents() if e.chunk_id in cids}
    if not inos:
        return []
    names: dict[int, list[tuple[int, bytes]]] = {}
    dirs = [a.ino for a in index.all_inodes() if stat.S_ISDIR(a.mode)]
    for parent in dirs:
        for _, name, child in index.list_entries(parent):
            names.setdefault(child, []).append((parent, name))

    def path(ino: int, seen=()) -> str:
        if ino == ROOT_INO:
            return ""
        if ino not in names or ino in seen:
            return f"/<inode {ino}>"
        parent, name = names[ino][0]
        return path(parent, (*seen, ino)) + "/" + os.fsdecode(name)

    out = []
    for ino in inos:
        if ino not in names:
            out.append(f"/<inode {ino}>")
        for parent, name in names.get(ino, []):
            out.append(path(parent) + "/" + os.fsdecode(name))
    return sorted(out)


# ----- --list ----------------------------------------------------------------------------------------
def list_snapshots(froms, expect: str | None, brokers=(), console: Console | None = None) -> dict:
    """`bpfs recover --list`: per partner, the snapshots it can serve. Writes nothing."""
    console = console or Console(quiet=True)
    froms = _check_froms(froms or [])
    if expect and len(froms) != 1:
        raise RecoveryError("--expect needs exactly one --from (the partner it names)", exit_code=2)
    broker_list = _brokers(brokers)
    keys = _keys()

    async def main():
        host = "::" if froms and ":" in froms[0].rsplit(":", 1)[0] else "0.0.0.0"
        config = TransportConfig(idle_timeout=PARTNER_IDLE_TIMEOUT)
        async with open_endpoint(keys.identity, host, 0, config=config, listen=False) as ep:
            async with trio.open_nursery() as nursery:
                finder = Finder(keys, ep, Lookups(ep, broker_list, nursery) if broker_list else None, nursery,
                                warn=console.warn)
                try:
                    console.progress("looking for partners...", force=True)
                    await finder.find(froms, expect)
                    book = RootBook(keys, console.warn)
                    holders, rows = holders_of(finder.live(), include_released=True)
                    if not rows:
                        raise no_partner(finder, "holds a snapshot of this store")
                    await book.open_many(holders, rows)
                    newest = max(book.opened.values(), key=lambda r: r.generation, default=None)
                    if newest is not None:
                        new = await finder.add_partner_list(partner_rows(newest.manifest))
                        holders, rows = holders_of(finder.live(), include_released=True)
                        if new:
                            await book.open_many({k: v for k, v in holders.items()
                                                  if k not in book.opened and k not in book.invalid}, rows)
                        reached = set(finder.sources)
                        for row in partner_rows(newest.manifest):
                            if row["peer_id"] not in reached and row["peer_id"] != keys.identity.peer_id:
                                console.warn(f"partner {row['peer_id']} could not be reached")
                    return _listing(finder, book, console)
                finally:
                    finder.close()
                    nursery.cancel_scope.cancel()

    try:
        result = trio.run(main)
    except KeyboardInterrupt:
        console.clear()
        raise RecoveryError("interrupted", exit_code=130) from None
    except BaseExceptionGroup as eg:
        console.clear()
        raise first_error(eg) from None
    console.clear()
    result["warnings"] = console.warnings
    return result


def _listing(finder: Finder, book: RootBook, console: Console) -> dict:
    everything = [(g, r.manifest.created_ns) for (g, _), r in book.opened.items()]
    names = snapshot_names(sorted(set(everything)))
    newest = max((g for g, _ in book.opened), default=0)
    partners = []
    for s in sorted(finder.live(), key=lambda s: s.peer_id):
        snaps = []
        for g in sorted(s.roots, reverse=True):
            row = s.roots[g]
            key = (g, row.digest)
            opened = book.opened.get(key)
            entry: dict = {"generation": g, "released": row.released, "valid": opened is not None}
            if opened is not None:
                m = opened.manifest
                entry.update(name=names[g], created=m.created_ns / 1e9, files=m.files, bytes=m.file_bytes)
            else:
                entry.update(name=snapshot_name(row.created), created=row.created / 1e9,
                             error=book.invalid.get(key, "not checked"))
            snaps.append(entry)
        partners.append({"peer_id": s.peer_id, "found": s.found, "address": s.address, "snapshots": snaps})
    if newest:
        for s in finder.live():
            mine = s.newest_root()
            if mine is not None and mine.generation < newest:
                console.warn(f"{s.peer_id} serves generation {mine.generation} as its newest, older than "
                             f"generation {newest} at another partner (missed syncs, or a rollback)")
    return {"partners": partners, "newest": newest}


def listing_lines(result: dict) -> list[str]:
    """`--list` as text."""
    out = []
    for p in result["partners"]:
        valid = [s for s in p["snapshots"] if s["valid"] and not s["released"]]
        out.append(f"{p['peer_id']} ({p['found']}, at {p['address']}): {len(valid)} snapshot"
                   f"{'s' if len(valid) != 1 else ''} to recover from"
                   + (f", newest generation {valid[0]['generation']}" if valid else ""))
        for s in p["snapshots"]:
            if s["valid"]:
                line = (f"  {s['generation']:>8}  {s['name']:<24}  {s['files']:>9,} files  "
                        f"{format_size(s['bytes']):>10}")
            else:
                line = f"  {s['generation']:>8}  {s['name']:<24}  DOES NOT VERIFY: {s.get('error')}"
            if s["released"]:
                line += "  (released: kept for the grace period only)"
            out.append(line)
    if result["newest"]:
        out.append(f"newest valid snapshot: generation {result['newest']}")
    return out
