"""Commands about partners: `bpfs pair`, `peers`, `unpair`, `status`, `sync`, `challenge` and
`reputation`.

Each asks the store's daemon through its control socket when one runs; without one, commands
that act (pair, unpair, sync, challenge) run the partner service in this process for the
moment they need it (`options.in_process`), and commands that only show read the ledger
(`peering.offline`).
"""

from __future__ import annotations

import json
import sys
import time

import click

from ..config import format_size, parse_brokers, parse_size
from ..errors import BpfsError
from ..peering import control
from ..rendezvous.pairing import DEFAULT_WORDS, MAX_WORDS, MIN_WORDS, parse_code
from .app import cli
from .options import (daemon_socket, emit, in_process, json_option, passphrase_option, resolve_store,
                      store_argument, store_option)


def _store_and_code(args) -> tuple[str | None, str | None]:
    """`pair`'s positional arguments: [STORE] [CODE] (a code starts with its number and a dash)."""
    import re

    looks_like_code = re.compile(r"^\s*\d+-[A-Za-z]")
    if len(args) > 2:
        raise click.UsageError("too many arguments: expected [STORE] [CODE]")
    if len(args) == 2:
        return args[0], args[1]
    if len(args) == 1:
        return (None, args[0]) if looks_like_code.match(args[0]) else (args[0], None)
    return None, None


COMPARE_IDS = ("Compare peer ids through another channel (by phone or in person, not the message that carried "
               "the code) before accepting: ")


def _describe_offer(info: dict, own_id: str) -> str:
    return (f"Partner {info['peer_id']}\n"
            f"  offers to keep up to {format_size(info['their_offer'])} of our data and asks us to keep up to "
            f"{format_size(info['their_ask'])} of its data.\n"
            f"  Agreed if you accept: we keep up to {format_size(info['we_keep'])} of its data, it keeps up to "
            f"{format_size(info['they_keep'])} of ours.\n"
            f"{COMPARE_IDS}the partner's `bpfs id` must show {info['peer_id']}, and it must see this store as "
            f"{own_id}. Someone who guessed the code would show another id.")


def _pair_by_code(store, sock, code, offer, ask, words, yes, as_json, passphrase_file, brokers) -> dict:
    """Both halves of pairing by code (see rendezvous.codepair), asking the user in between."""
    from ..peering import offline  # lazily: it loads the partner service

    if code:
        parse_code(code)  # a mistyped code fails here, in one line, before anything starts
    if not yes and not sys.stdin.isatty():
        raise BpfsError("pairing by code asks you to confirm the partner: run it in a terminal, or pass --yes",
                        exit_code=2)
    own_id = offline.own_id(store)

    def show_code(res: dict) -> None:
        minutes = max(1, round((res["expires"] - time.time()) / 60))
        if as_json:
            click.echo(json.dumps({"code": res["code"], "expires": res["expires"], "peer_id": own_id}))
        else:
            click.echo(f"code: {res['code']}   (this store is {own_id}: compare peer ids before accepting)")
            click.echo(f"On the partner's machine run:  bpfs pair {res['code']}   (valid {minutes} minutes, "
                       f"once; waiting...)\n{COMPARE_IDS}the partner must see this store as {own_id}.", err=True)
        sys.stdout.flush()

    def confirm(info: dict) -> bool:
        click.echo(_describe_offer(info, own_id), err=True)
        if yes:
            return True
        return click.confirm(f"Is {info['peer_id']} the peer id your partner sees in `bpfs id`, and do you pair "
                             "with it?", default=False, err=True)

    def flow(call) -> dict:
        """The steps, whoever runs the service: `call(op, **args)` asks it and waits for the answer."""
        session = None
        try:
            if code:
                info = call("code_join", code=code, offer=offer, ask=ask)
            else:
                res = call("code_open", offer=offer, ask=ask, words=words)
                session = res["session"]
                show_code(res)
                info = call("code_wait", session=session)
            session = info["session"]
            result = call("code_decide", session=session, accept=confirm(info))
            session = None
            return result
        finally:
            if session is not None:  # interrupted or failed: free the code now rather than at its expiry
                try:
                    call("code_cancel", session=session)
                except Exception:  # best effort: the session expires with its code anyway
                    pass

    if sock:
        return flow(lambda op, **args: control.call(sock, op, **args))

    async def run(service):
        import functools

        import trio

        operations = service.operations()

        def call(op: str, **args):
            return trio.from_thread.run(functools.partial(operations[op], **args))

        return await trio.to_thread.run_sync(flow, call)  # the prompt must not block the service

    return in_process(store, passphrase_file, run, brokers=brokers)


def _direct_hint(store: str, sock: str | None, own_id: str) -> str:
    """What the other side of `bpfs pair --accept` runs: with the addresses this store's daemon
    listens on, a placeholder (and how to learn them) when none is known."""
    from ..store import read_daemon_info

    addresses = ((read_daemon_info(store) or {}).get("addresses") or []) if sock else []
    if addresses:
        more = (f"\n  (this store also listens on {', '.join(addresses[1:])}: give the partner the address it "
                "can reach)") if len(addresses) > 1 else ""
        return f"On the other side run:\n  bpfs pair --direct {addresses[0]} --expect {own_id}{more}"
    why = ("This store's daemon does not listen for partners (--listen none): pair by code instead, or restart "
           "it with --listen HOST:PORT; `bpfs id` then shows the addresses it listens on." if sock else
           "No daemon runs for this store, so nothing listens yet: start one (bpfs mount or bpfs serve); "
           "`bpfs id` then shows the addresses it listens on.")
    return f"{why}\nOn the other side run, with one of those addresses:\n  bpfs pair --direct HOST:PORT --expect {own_id}"


def _fmt_time(t) -> str:
    if not t:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _store_and_peer(args, store_opt) -> tuple[str, str]:
    """[STORE] PEER_ID as positional arguments (or --store STORE PEER_ID)."""
    if len(args) == 1:
        return resolve_store(None, store_opt), args[0]
    if len(args) == 2:
        return resolve_store(args[0], store_opt), args[1]
    raise click.UsageError("expected [STORE] PEER_ID")


def _pct(x) -> str:
    return "-" if x is None else f"{x * 100:.1f} %"


def _describe_audit(res: dict) -> str:
    lines = [f"{res['peer_id']}: {res['checked']} packs audited, {res['passed']} proven, "
             f"{len(res['failed'])} failed; trust level {res['trust']}"
             + (f" ({res['trust_reason']})" if res.get("trust_reason") else "")]
    if not res["checked"] and not res["failed"]:
        lines.append("  it holds none of our packs yet: nothing to prove")
    for f in res["failed"]:
        lines.append(f"  pack {f['pack']}: {f['outcome']}")
    if res.get("released"):
        lines.append(f"  {res['released']} packs were released (kept there for the grace period): not audited")
    if res.get("unverifiable"):
        lines.append(f"  {res['unverifiable']} packs have no recorded root here: not audited")
    if res.get("limited"):
        lines.append(f"  stopped early: {res['limited']}")
    return "\n".join(lines)


@cli.command()
@click.argument("args", nargs=-1, metavar="[STORE] [CODE]")
@click.option("--accept", "accept", metavar="PEER_ID", help="allow PEER_ID to pair with this store")
@click.option("--direct", "direct", metavar="HOST:PORT", help="pair with the store listening there")
@click.option("--expect", metavar="PEER_ID", help="the peer id the store at HOST:PORT must have")
@click.option("--offer", default="10G", show_default=True, help="how much of the partner's data we keep")
@click.option("--ask", default="10G", show_default=True, help="how much of ours we ask the partner to keep")
@click.option("--broker", "brokers", multiple=True, metavar="HOST[:PORT]",
              help="broker(s) to pair through, tried in order (default: the store's; see bpfs.toml)")
@click.option("--words", type=click.IntRange(MIN_WORDS, MAX_WORDS), default=DEFAULT_WORDS, show_default=True,
              help="words in a new code (each adds 8 bits against guessing; fewer than 3 are not offered)")
@click.option("--yes", is_flag=True, help="accept the partner's identity and offer without asking")
@json_option()
@passphrase_option("when no daemon runs")
@store_option
def pair(args, accept, direct, expect, offer, ask, brokers, words, yes, as_json, passphrase_file, store_opt):
    """Pair with a partner.

    \b
    By code, through a broker (no addresses, no open ports needed):
      bpfs pair [STORE]          prints a code, waits for the partner
      bpfs pair [STORE] CODE     on the partner's machine, with that code
    Directly: --accept PEER_ID on one side, then --direct HOST:PORT on the other."""
    from ..peering import offline  # lazily: it loads the partner service

    store, code = _store_and_code(args)
    store = resolve_store(store, store_opt)
    offer_n, ask_n = parse_size(offer), parse_size(ask)
    if accept and direct or (code and (accept or direct)):
        raise click.UsageError("give one of CODE, --accept PEER_ID or --direct HOST:PORT")
    if brokers and (accept or direct):
        raise click.UsageError("--broker is for pairing by code")
    sock = daemon_socket(store)
    if not accept and not direct:
        broker_list = parse_brokers(brokers) if brokers else None
        if sock and broker_list is not None:
            raise BpfsError("the store's daemon is running with its own brokers: --broker works only "
                            "without a daemon (or set brokers in bpfs.toml and restart it)", exit_code=2)
        res = _pair_by_code(store, sock, code, offer_n, ask_n, words, yes, as_json, passphrase_file,
                            broker_list)
        emit(as_json, res, f"Paired with {res['peer_id']} ({res.get('path') or 'not connected yet'}): we keep "
                           f"up to {format_size(res['we_keep'])} of its data, it keeps up to "
                           f"{format_size(res['they_keep'])} of ours.")
        return
    if accept:
        if sock:
            res = control.call(sock, "invite", peer=accept, offer=offer_n, ask=ask_n)
        else:
            res = offline.invite(store, accept, offer_n, ask_n)
        emit(as_json, res, f"{accept} may now pair with this store (it asks: keep up to "
                           f"{format_size(offer_n)} of its data; we ask it to keep up to {format_size(ask_n)}).\n"
                           + _direct_hint(store, sock, offline.own_id(store)))
        return

    def confirm(peer: str) -> None:
        if yes:
            return
        if not sys.stdin.isatty():
            raise BpfsError(f"the store at {direct} has peer id {peer}; pass --expect {peer} (or --yes) "
                            "to pair with it", exit_code=2)
        click.confirm(f"The store at {direct} has peer id\n  {peer}\nIs this the partner you expect?",
                      abort=True)

    if sock:
        peer = expect
        if peer is None:
            peer = control.call(sock, "probe", address=direct)["peer_id"]
            confirm(peer)
        res = control.call(sock, "pair", address=direct, expect=peer, offer=offer_n, ask=ask_n)
    else:
        async def run(service):
            peer = expect
            if peer is None:
                peer = (await service.op_probe(direct))["peer_id"]
                confirm(peer)
            return await service.op_pair(direct, peer, offer_n, ask_n)

        res = in_process(store, passphrase_file, run)
    emit(as_json, res, f"Paired with {res['peer_id']} at {res['address']}: we keep up to "
                       f"{format_size(res['we_keep'])} of its data, it keeps up to "
                       f"{format_size(res['they_keep'])} of ours.")

@cli.command()
@store_argument()
@json_option()
def peers(store, as_json):
    """List partners: quotas both ways, bytes held, last seen, connection state."""
    from ..peering import offline  # lazily: it loads the partner service

    sock = daemon_socket(store)
    rows = control.call(sock, "peers") if sock else offline.offline_peers(store)
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no partners. Pair by code: `bpfs pair` on one machine prints a code, `bpfs pair CODE` on the "
                   "other uses it;\nor directly: `bpfs pair --accept PEER_ID` on one side, then "
                   "`bpfs pair --direct HOST:PORT` on the other")
    for r in rows:
        where = r['address'] or ('(address sealed)' if r.get('sealed') else '(dials us)')
        state = r['state'] + (" (via relay)" if r.get("path") == "via relay" else "")
        click.echo(f"{r['peer_id']}  {state:<9} {r.get('trust', '-'):<9} {where}\n"
                   + (f"    {r['reason']}\n" if r.get("reason") else "") +
                   (f"    we keep {format_size(r['held_for_them'])} of {format_size(r['we_keep'])} for it; "
                    f"it keeps {format_size(r['held_by_them'])} of {format_size(r['they_keep'])} for us; "
                    if r['state'] != "ended" else
                    f"    unpaired {_fmt_time(r.get('ended_at'))}: it still holds {format_size(r['held_by_them'])} "
                    f"of ours and we {format_size(r['held_for_them'])} of its, deleted after the grace period; ")
                   + f"last seen {_fmt_time(r['last_seen'])}")

@cli.command()
@click.argument("args", nargs=-1, metavar="[STORE] PEER_ID")
@passphrase_option("when no daemon runs")
@store_option
def unpair(args, passphrase_file, store_opt):
    """End the partnership with PEER_ID: it is told; our data there goes after its grace period."""
    store, peer = _store_and_peer(args, store_opt)
    sock = daemon_socket(store)
    if sock:
        res = control.call(sock, "unpair", peer=peer)
    else:
        res = in_process(store, passphrase_file, lambda service: service.op_unpair(peer))
    click.echo(f"Unpaired {peer}" + ("" if res["told"] else " (it was not reachable: it will be refused "
                                      "from now on)") + f"; data held for each other is deleted after "
               f"{res['grace_days']:g} days"
               + (f" (it holds {format_size(res['held_by_them'])} of ours, we {format_size(res['held_for_them'])}"
                  " of its)" if "held_by_them" in res else "") + ".")

@cli.command()
@store_argument()
@json_option()
def status(store, as_json):
    """What is replicated to each partner, what is pending, the rate and an estimate."""
    from ..peering import offline  # lazily: it loads the partner service

    sock = daemon_socket(store)
    doc = control.call(sock, "status") if sock else offline.offline_status(store)
    doc["daemon"] = bool(sock)
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(f"latest snapshot generation {doc['latest_generation']}"
               + ("" if sock else " (no daemon running: nothing is being sent)"))
    if not doc["partners"]:
        click.echo("no partners")
    if doc.get("shortfall"):
        click.echo(f"ALARM: the replica target cannot be met: {doc['shortfall']}")
    dur = doc.get("durability") or {}
    if dur.get("files") is not None:
        click.echo(f"{dur['below_target_files']} of {dur['files']} files ({format_size(dur['below_target_bytes'])}"
                   f" of {format_size(dur['bytes'])}) are below the target of {dur['target']} cop"
                   f"{'y' if dur['target'] == 1 else 'ies'}"
                   + (f"; {dur['local_files']} file{'' if dur['local_files'] == 1 else 's'}"
                      f" ({format_size(dur['local_bytes'])}) kept local (.backupignore, max_file_size)"
                      if dur.get("local_files") else ""))
    for p in doc["partners"]:
        total = p["replicated_bytes"] + p["pending_bytes"]
        frac = p.get("progress", p["replicated_bytes"] / total if total else 1.0)  # counts packs under way
        bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
        eta = f", about {p['eta']} s left" if p.get("eta") else ""
        path = f" ({p['path']})" if p.get("path") else ""
        trust = f"  trust: {p['trust']}" + (f" ({p['trust_reason']})" if p.get("trust_reason") else "") \
            if p.get("trust") else ""
        click.echo(f"{p['peer_id']}  [{bar}] {frac * 100:5.1f}%  {p['state']}{path}{trust}\n"
                   f"    {p['replicated_packs']} packs ({format_size(p['replicated_bytes'])}) replicated, "
                   f"{p['pending_packs']} ({format_size(p['pending_bytes'])}) pending, "
                   f"{format_size(p['rate'])}/s{eta}; root generation {p['root_generation']}"
                   + (f"\n    {p['reason']}" if p.get("reason") else "")
                   + (f"\n    last error: {p['last_error']}" if p.get("last_error") else "")
                   + (f"\n    ALARM: {p['root_alarm']}" if p.get("root_alarm") else ""))

@cli.command()
@store_argument()
@click.option("--timeout", type=float, default=None, help="exit 1 if not done after this many seconds")
@json_option()
@passphrase_option("when no daemon runs")
def sync(store, timeout, as_json, passphrase_file):
    """Wait until everything written so far is held by the partners (run before unplugging)."""
    sock = daemon_socket(store)
    if sock:
        res = control.call(sock, "sync", timeout=timeout)
    else:
        res = in_process(store, passphrase_file, lambda service: service.op_sync(timeout))
    emit(as_json, res, f"Synced: generation {res['generation']} is held by {len(res['partners'])} "
                       f"partner(s) ({res['seconds']:.1f} s).")

@cli.command()
@click.argument("args", nargs=-1, metavar="[STORE] PEER_ID")
@click.option("--packs", type=click.IntRange(1), default=None,
              help="audit this many packs chosen at random (default: every pack it holds for us)")
@click.option("--leaves", type=click.IntRange(1, 32), default=4, show_default=True,
              help="random 2 KiB pieces proven per pack")
@json_option()
@passphrase_option("when no daemon runs")
@store_option
def challenge(args, packs, leaves, as_json, passphrase_file, store_opt):
    """Ask PEER_ID to prove now that it still holds our packs; exit 1 if any proof fails."""
    store, peer = _store_and_peer(args, store_opt)
    sock = daemon_socket(store)
    if sock:
        res = control.call(sock, "challenge", peer=peer, packs=packs, leaves=leaves)
    else:
        res = in_process(store, passphrase_file, lambda service: service.op_challenge(peer, packs, leaves))
    emit(as_json, res, _describe_audit(res))
    if res["failed"]:
        sys.exit(1)

@cli.command()
@store_argument()
@json_option()
def reputation(store, as_json):
    """Partners by score, with what makes it up: audits, uptime, dials, response time."""
    from ..peering import offline  # lazily: it loads the partner service

    sock = daemon_socket(store)
    rows = control.call(sock, "reputation") if sock else offline.offline_reputation(store)
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no partners")
    for r in rows:
        rt = "-" if r["response_time"] is None else f"{r['response_time']:.2f} s"
        click.echo(f"{r['peer_id']}  {r['level']:<9} score {r['score']:.3f}"
                   + (f"  ({r['reason']})" if r["reason"] else "") + "\n"
                   f"    audits: score {r['audit_score']:.3f}, {r['proofs_passed']} proofs passed, "
                   f"{r['proofs_failed']} failed, last {_fmt_time(r['last_audit_at'])}; uptime {_pct(r['uptime'])}"
                   f"; dials {_pct(r['dial_success'])}; proof round trip {rt}\n"
                   f"    {'assigned' if r['assigned'] else 'not assigned'}; holds {r['held_packs']} of our packs"
                   f" ({r['failing_packs']} failing)")

