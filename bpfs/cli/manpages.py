"""Man pages generated from the click definitions: `bpfs(1)` (the commands, environment, files,
exit status), `bpfs-COMMAND(1)` for every command (`bpfs-GROUP-COMMAND(1)` in a nested group) and
`bpfs-broker(1)`.

    python -m bpfs.cli.manpages OUTDIR     writes OUTDIR/bpfs.1, OUTDIR/bpfs-mount.1, ...

A command's page has NAME, SYNOPSIS, its help text as DESCRIPTION, ARGUMENTS, OPTIONS (each with
the help and default `--help` shows) and SEE ALSO, so the pages say what `--help` says. The
mount(8) helper's page, mount.bpfs(8), is written by hand (packaging/man/mount.bpfs.8). `make man`
writes them all to build/man, `make install` under $(PREFIX)/share/man, and the Debian package
installs them with dh_installman. The header's date is SOURCE_DATE_EPOCH's, else there is none:
the output depends on the click definitions only.
"""

from __future__ import annotations

import datetime
import inspect
import os
import re
import sys
from dataclasses import dataclass

import click

from .. import __version__
from . import cli
from .options import STORE_HELP

MANUAL = "bpfs manual"
HANDWRITTEN = {"mount.bpfs": "8"}  # pages written by hand (packaging/man/), which generated pages name

# Argument words (in metavars such as "[STORE] MOUNTPOINT"): click arguments carry no help text.
ARGUMENT_HELP = {
    "STORE": STORE_HELP,
    "MOUNTPOINT": "the mount point, a folder (for `bpfs mount` an empty one, unless `-o nonempty` is given)",
    "PEER_ID": "a partner's peer id, as `bpfs peers` shows it",
    "CODE": "the code `bpfs pair` printed on the partner's machine",
}

# More to see from a command's page than bpfs(1) and the commands of its own module.
EXTRA_SEE_ALSO = {
    "bpfs-mount": ["mount.bpfs(8)"], "bpfs-umount": ["mount.bpfs(8)"],
    "bpfs-serve": ["bpfs-broker(1)"], "bpfs-pair": ["bpfs-broker(1)"], "bpfs-recover": ["bpfs-broker(1)"],
    "bpfs-broker": ["bpfs(1)", "bpfs-pair(1)", "bpfs-serve(1)"],
}

# Sections that are not in the click definitions: (title, [paragraph or (tag, text)]), `code` in bold.
Items = list[str | tuple[str, str]]
EXTRA_SECTIONS: dict[str, list[tuple[str, Items]]] = {
    "bpfs": [
        ("DESCRIPTION", [
            "Every command about a store takes it as its first argument or as `--store STORE`; both default "
            "to `$BPFS_STORE`, then `~/.local/share/bpfs/store`. Every command has `--help` and a page "
            "`bpfs-COMMAND`(1); reporting commands take `--json`. The passphrase comes from "
            "`--passphrase-file FILE`, `$BPFS_PASSPHRASE` or a prompt. Errors are one line on standard error."]),
        ("ENVIRONMENT", [
            ("BPFS_STORE", "the store of commands given none (else `$XDG_DATA_HOME/bpfs/store`, by default "
                           "`~/.local/share/bpfs/store`)"),
            ("BPFS_PASSPHRASE", "the store's passphrase, when no `--passphrase-file` (or `keyfile=` mount "
                                "option) is given; without either it is asked for on the terminal"),
            ("BPFS_RECOVERY", "the recovery secret for `bpfs recover` (else it is asked for)"),
            ("BPFS_BROKER", "the brokers to use, comma-separated `HOST[:PORT][/PEER_ID]`, or `none`: overrides "
                            "`brokers` in `STORE/bpfs.toml`; `--broker` overrides it"),
            ("BPFS_LISTEN", "the UDP address `bpfs mount` and `bpfs serve` serve partners on when `--listen` is "
                            "not given (`none`: a mount does not listen); overrides `listen` in `STORE/bpfs.toml`"),
            ("BPFS_LOG_FILE", "the daemon's log file, instead of `STORE/log/daemon.log`"),
        ]),
        ("FILES", [
            ("STORE/key.json", "the store's keys, wrapped by the passphrase (Argon2id)"),
            ("STORE/bpfs.toml", "the store's settings (replication, history, trust, partners), written by "
                                "`bpfs init` with every setting commented out at its default"),
            ("STORE/log/daemon.log", "the daemon's log (no file names, no keys)"),
        ]),
        ("EXIT STATUS", [
            ("0", "success"),
            ("1", "failure, or damage found"),
            ("2", "bad input: usage, wrong passphrase, no store there, a mount point that is not empty"),
            ("3", "busy: the store is already mounted, or the mount point is in use"),
            ("130", "interrupted"),
        ]),
    ],
    "bpfs-broker": [
        ("DESCRIPTION", [
            "A broker helps bpfs stores find each other, pair by code and get through NAT, and relays their "
            "end-to-end encrypted traffic when hole punching fails; it never sees keys or file data. It serves "
            "UDP port 7451 unless `--listen` or the config's `listen` says otherwise.",
            "Once listening it prints `broker PEER_ID listening on HOST:PORT` on standard error (with "
            "`--log-format json`, the `listening` event says it) and, with `--ready-file`, writes "
            "`{\"peer_id\", \"address\", \"pid\"}` there. SIGTERM or SIGINT shut it down cleanly."]),
        ("FILES", [
            ("/etc/bpfs/broker.toml", "its settings, read when the file exists and no `--config` is given; it "
                                      "holds no secrets, and one the broker cannot read is an error"),
            ("/var/lib/bpfs-broker/identity.key", "the broker's identity (an Ed25519 seed, 0600), created on the "
                                                  "first start; its peer id, which stores may pin, follows from it"),
            ("/var/lib/bpfs-broker", "the default `--state-dir` (0700): the identity and the LMDB state"),
        ]),
        ("EXIT STATUS", [
            ("0", "after a clean shutdown"),
            ("1", "it cannot start (the address or the state directory is in use)"),
            ("2", "bad input (options, config, identity file)"),
        ]),
    ],
}


@dataclass
class Page:
    name: str  # "bpfs-mount"
    section: str  # "1"
    text: str

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"


# ----- roff ---------------------------------------------------------------------------------------
def escape(text: str) -> str:
    """Plain text for roff: backslashes, hyphens as \\- (options copy and paste), non-ASCII as \\[uXXXX]."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)


def _fonted(text: str, pattern: re.Pattern[str], font: str) -> str:
    """`text` escaped, the first group of each match of `pattern` in `font` (B, I)."""
    out, pos = [], 0
    for m in pattern.finditer(text):
        out += [escape(text[pos:m.start()]), f"\\f{font}{escape(m.group(1))}\\fR"]
        pos = m.end()
    return "".join(out) + escape(text[pos:])


CODE = re.compile(r"`([^`]+)`")
METAVAR = re.compile(r"([A-Z][A-Z0-9_]*)")
OPTION_NAME = re.compile(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)")


def inline(text: str) -> str:
    """Prose: `code` in bold."""
    return _fonted(text, CODE, "B")


def usage(text: str) -> str:
    """A usage or an option's names: option names in bold, metavars (STORE, HOST:PORT) in italics."""
    out, pos = [], 0
    for m in OPTION_NAME.finditer(text):
        out += [_fonted(text[pos:m.start()], METAVAR, "I"), f"\\fB{escape(m.group(1))}\\fR"]
        pos = m.end()
    return "".join(out) + _fonted(text[pos:], METAVAR, "I")


def line(text: str) -> str:
    """A text line that roff does not take for a request (a leading . or ')."""
    return "\\&" + text if text[:1] in (".", "'") else text


def quoted(arg: str) -> str:
    return '"' + escape(arg).replace('"', "\\(dq") + '"'


def paragraphs(help_text: str) -> list[str]:
    """A click help text: paragraphs refilled, a `\\b` paragraph kept line by line."""
    out: list[str] = []
    text = inspect.cleandoc(help_text.split("\f")[0]).strip()
    for para in re.split(r"\n\s*\n", text) if text else []:
        lines = para.splitlines()
        if lines[0].strip() == "\b":
            out += [".PP", ".nf"] + [line(inline(ln.rstrip())) for ln in lines[1:]] + [".fi"]
        else:
            out += [".PP", line(inline(" ".join(ln.strip() for ln in lines)))]
    return out


def items(entries: Items) -> list[str]:
    out: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            out += [".PP", line(inline(entry))]
        else:
            out += [".TP", line("\\fB" + escape(entry[0]) + "\\fR"), line(inline(entry[1]))]
    return out


def see_also(refs: list[str]) -> list[str]:
    out = []
    for i, ref in enumerate(refs):
        name, section = ref[:-1].split("(")
        out.append(f".BR {escape(name)} ({section}){',' if i < len(refs) - 1 else ''}")
    return out


# ----- pages --------------------------------------------------------------------------------------
def _context(cmd: click.Command, name: str, parent: click.Context | None) -> click.Context:
    settings = {"show_default": True, **cmd.context_settings}  # every default shown, as on the pages
    return click.Context(cmd, info_name=name, parent=parent, **settings)


def commands() -> list[tuple[str, click.Command, click.Context]]:
    """(page name, command, context) for bpfs, each of its commands (recursively) and bpfs-broker."""
    from broker.cli import main as broker_main

    out = []

    def walk(cmd: click.Command, ctx: click.Context, page: str) -> None:
        out.append((page, cmd, ctx))
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, _context(sub, name, ctx), f"{page}-{name}")

    walk(cli, _context(cli, "bpfs", None), "bpfs")
    out.append(("bpfs-broker", broker_main, _context(broker_main, "bpfs-broker", None)))
    return out


def _metavar(param: click.Parameter, ctx: click.Context) -> str:
    try:
        return param.make_metavar(ctx)
    except TypeError:  # click < 8.2
        return param.make_metavar()  # type: ignore[call-arg]


def _summary(cmd: click.Command, prog: str) -> str:
    text = cmd.get_short_help_str(limit=1000).rstrip(".")
    text = re.sub(rf"^{re.escape(prog)}:\s*", "", text)
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _see_also(page: str, cmd: click.Command, found: list[tuple[str, click.Command, click.Context]]) -> list[str]:
    """bpfs(1) lists every page; a command's names bpfs(1), the commands of its module and EXTRA_SEE_ALSO."""
    produced = [p for p, _, _ in found]
    handwritten = [f"{n}({s})" for n, s in HANDWRITTEN.items()]
    if page == "bpfs":
        refs = [f"{p}(1)" for p in sorted(produced) if p != page] + handwritten
    else:
        module = getattr(cmd.callback, "__module__", None)
        refs = ["bpfs(1)"] + sorted(f"{p}(1)" for p, c, _ in found if p != page and module is not None
                                    and getattr(c.callback, "__module__", None) == module)
    refs += EXTRA_SEE_ALSO.get(page, [])
    known = {f"{p}(1)" for p in produced} | set(handwritten)  # only pages that exist
    return [r for r in dict.fromkeys(refs) if r in known]


def render(page: str, cmd: click.Command, ctx: click.Context,
           found: list[tuple[str, click.Command, click.Context]]) -> str:
    prog = ctx.command_path
    date = ""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        stamp = datetime.datetime.fromtimestamp(int(os.environ["SOURCE_DATE_EPOCH"]), datetime.UTC)
        date = stamp.strftime("%Y-%m-%d")
    out = [f'.\\" {page}(1): generated by bpfs.cli.manpages from the click definitions; do not edit.',
           ".TH " + " ".join(quoted(a) for a in (page.upper(), "1", date, f"bpfs {__version__}", MANUAL)),
           ".nh",  # no hyphenation: paths and options stay whole
           ".SH NAME", f"{escape(page)} \\- {inline(_summary(cmd, prog))}",
           ".SH SYNOPSIS", f".B {escape(prog)}", line(usage(" ".join(cmd.collect_usage_pieces(ctx))))]
    extra = dict(EXTRA_SECTIONS.get(page, []))
    out += [".SH DESCRIPTION"] + paragraphs(cmd.help or "") + items(extra.pop("DESCRIPTION", []))
    if isinstance(cmd, click.Group):
        out.append(".SH COMMANDS")
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            pieces = sub.collect_usage_pieces(_context(sub, name, ctx))
            out += [".TP", line(f"\\fB{escape(name)}\\fR " + usage(" ".join(pieces))),
                    line(inline(f"{_summary(sub, name)}; see `{page}-{name}`(1)."))]
    arguments = [p for p in cmd.get_params(ctx) if isinstance(p, click.Argument)]
    words = list(dict.fromkeys(w for p in arguments for w in METAVAR.findall(_metavar(p, ctx))))
    if words:
        out.append(".SH ARGUMENTS")
        for word in words:
            out += [".TP", f"\\fI{escape(word)}\\fR", line(inline(ARGUMENT_HELP.get(word, "see DESCRIPTION")))]
    records = [p.get_help_record(ctx) for p in cmd.get_params(ctx) if isinstance(p, click.Option)]
    if any(records):
        out.append(".SH OPTIONS")
        for record in records:
            if record is None:
                continue
            names, help_text = record
            help_text, _, extras = help_text.partition("  [")
            out += [".TP", line(usage(names))]
            out += [line(inline(t)) for t in (help_text, "[" + extras if extras else "") if t]
    for title, entries in extra.items():
        out += [f".SH {title}"] + items(entries)
    refs = _see_also(page, cmd, found)
    if refs:
        out += [".SH SEE ALSO"] + see_also(refs)
    # no paragraph macro right after a section heading (it would be empty)
    text = "\n".join(ln for i, ln in enumerate(out) if not (ln == ".PP" and out[i - 1].startswith(".SH")))
    return text + "\n"


def pages() -> list[Page]:
    found = commands()
    return [Page(page, "1", render(page, cmd, ctx, found)) for page, cmd, ctx in found]


def write_pages(outdir: str) -> list[str]:
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for page in pages():
        path = os.path.join(outdir, page.filename)
        with open(path, "w", encoding="ascii") as f:
            f.write(page.text)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m bpfs.cli.manpages OUTDIR", file=sys.stderr)
        return 2
    paths = write_pages(args[0])
    print(f"manpages: {len(paths)} pages in {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
