"""Man pages (bpfs.cli.manpages, packaging/man/mount.bpfs.8): one page per click command, each
naming every option of its command, roff that groff renders without a warning, the hand-written
mount.bpfs(8) naming every option the helper knows, and the packaging (make man, make install,
the Debian package, the systemd units' Documentation=) pointing at pages that exist."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess

import click
import pytest

from bpfs.cli import cli, manpages
from broker.cli import main as broker_main
from tests.helpers.cli import REPO

HANDWRITTEN = REPO / "packaging" / "man" / "mount.bpfs.8"
HELPER = REPO / "mount_helper" / "mount.bpfs"
UNITS = REPO / "packaging" / "systemd"


def all_commands(cmd: click.Command, page: str):
    """(page name, command) for cmd and every command under it, found without the generator."""
    yield page, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            if not sub.hidden:
                yield from all_commands(sub, f"{page}-{name}")


EXPECTED = dict(all_commands(cli, "bpfs")) | {"bpfs-broker": broker_main}


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """{file name: text} of the generated pages, written as `python -m bpfs.cli.manpages` does."""
    out = tmp_path_factory.mktemp("man")
    assert manpages.main([str(out)]) == 0
    return {p.name: p.read_text(encoding="ascii") for p in sorted(out.iterdir())}


def render(path, wide: bool = False) -> subprocess.CompletedProcess:
    """groff with every warning on; the text without bold/underline overstriking (`wide`: on lines
    long enough that nothing is wrapped or justified)."""
    return subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-P", "-cbou", *(["-rLL=250n"] if wide else []), str(path)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "LC_ALL": "C.UTF-8"})


def plain(text: str) -> str:
    """Rendered text with the hyphens and quotes groff may print for \\- and ' made ASCII."""
    return text.replace("\u2212", "-").replace("\u2010", "-").replace("\u2019", "'")


def test_every_click_command_has_a_page_and_nothing_else_is_generated(pages):
    assert set(pages) == {f"{name}.1" for name in EXPECTED}
    assert {"bpfs.1", "bpfs-mount.1", "bpfs-serve.1", "bpfs-broker.1"} <= set(pages)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_page_names_its_command_and_every_option_and_argument(pages, name):
    text, cmd = pages[f"{name}.1"], EXPECTED[name]
    ctx = click.Context(cmd, info_name=name, help_option_names=["-h", "--help"])
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SEE ALSO"):
        assert f"\n.SH {section}\n" in text, f"{name}: no {section}"
    assert text.count("\n.TH ") == 1 and f'.TH "{manpages.escape(name.upper())}" "1"' in text
    assert f"\n{manpages.escape(name)} \\- " in text  # NAME: name \- summary
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            for opt in param.opts + param.secondary_opts:
                assert f"\\fB{manpages.escape(opt)}\\fR" in text, f"{name}: option {opt} missing"
            if param.help:
                first_words = " ".join(param.help.split()[:3]).split("`")[0]
                assert manpages.escape(first_words) in text, f"{name}: help of {param.opts} missing"
        if isinstance(param, click.Argument):
            for word in re.findall(r"[A-Z][A-Z0-9_]*", param.make_metavar(ctx)):
                assert f"\\fI{word}\\fR" in text.split("\n.SH ARGUMENTS\n")[1], f"{name}: argument {word}"
    if isinstance(cmd, click.Group):
        for sub in cmd.commands:
            assert f".BR {manpages.escape(name)}\\-{sub} (1)" in text  # SEE ALSO lists each command's page


def test_defaults_are_on_the_pages(pages):
    assert "[default: 10G]" in pages["bpfs-pair.1"]
    assert "[default: moderate]" in pages["bpfs-init.1"]
    assert "[default: /var/lib/bpfs\\-broker]" in pages["bpfs-broker.1"]


def test_see_also_names_only_pages_that_exist(pages):
    existing = {name[:-2] + "(1)" for name in pages} | {"mount.bpfs(8)"}
    for name, text in pages.items():
        refs = re.findall(r"^\.BR (\S+) \((\d)\),?$", text.split("\n.SH SEE ALSO\n")[1], re.M)
        assert refs, name
        for ref, section in refs:
            assert f"{ref.replace(chr(92) + '-', '-')}({section})" in existing, f"{name}: SEE ALSO {ref}({section})"


def test_roff_escaping():
    assert manpages.escape("a-b \\n") == "a\\-b \\en"
    assert manpages.escape("caf\u00e9 \u2014") == "caf\\[u00E9] \\[u2014]"
    assert manpages.line(".hidden") == "\\&.hidden" and manpages.line("'quote") == "\\&'quote"
    assert manpages.line("plain .dot") == "plain .dot"
    assert manpages.inline("run `bpfs init --kdf x`") == "run \\fBbpfs init \\-\\-kdf x\\fR"
    assert manpages.usage("--broker HOST[:PORT]") == "\\fB\\-\\-broker\\fR \\fIHOST\\fR[:\\fIPORT\\fR]"
    # a help text whose paragraph starts with a dot or an apostrophe stays text; \b keeps lines
    lines = manpages.paragraphs(".bpfs files\n\n'quoted'\n\n\b\n  kept  as is\n  line two\n\n\fhidden")
    assert lines == [".PP", "\\&.bpfs files", ".PP", "\\&'quoted'", ".PP", ".nf", "  kept  as is", "  line two", ".fi"]
    # every text line of every page: no stray request, no raw non-ASCII
    for page in manpages.pages():
        for ln in page.text.splitlines():
            assert ln.isascii()
            assert not ln.startswith("'"), ln
            if ln.startswith("."):
                assert re.match(r'\.(\\"|TH|SH|PP|TP|BR|B|nf|fi|nh)( |$)', ln), f"{page.filename}: {ln}"


def test_output_is_deterministic_and_dated_by_source_date_epoch(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = [p.text for p in manpages.pages()]
    assert first == [p.text for p in manpages.pages()]
    assert '"1" "" "bpfs ' in first[0]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")  # 2026-01-01T00:00:00Z
    assert '"1" "2026\\-01\\-01" "bpfs ' in manpages.pages()[0].text


@pytest.fixture(scope="module")
def groff():
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (make deps installs groff-base)")


def test_every_page_renders_without_a_warning(pages, groff, tmp_path):
    for name, text in [*pages.items(), (HANDWRITTEN.name, HANDWRITTEN.read_text())]:
        path = tmp_path / name
        path.write_text(text)
        cp = render(path)
        assert cp.returncode == 0 and cp.stderr == "", f"{name}: {cp.stderr}"
        out = plain(cp.stdout)
        assert "NAME" in out and "SEE ALSO" in out, name
    # what a reader sees: the options as typed
    out = plain(render(tmp_path / "bpfs-mount.1", wide=True).stdout)
    assert "bpfs mount [OPTIONS] [STORE] MOUNTPOINT" in out
    for opt in ("--foreground", "--passphrase-file FILE", "--listen HOST:PORT", "--init", "-o OPTIONS"):
        assert opt in out
    assert "bpfs-mount - mount STORE at MOUNTPOINT" in out
    out = plain(render(tmp_path / "bpfs-pair.1", wide=True).stdout)
    assert "  bpfs pair [STORE] CODE     on the partner's machine" in out  # the \b block kept as written


def load_helper():
    loader = importlib.machinery.SourceFileLoader("mount_bpfs_helper_for_man", str(HELPER))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_mount_bpfs_page_describes_what_the_helper_does():
    text = HANDWRITTEN.read_text()
    helper = load_helper()
    assert '.TH "MOUNT.BPFS" "8"' in text
    for opt in sorted(helper.DROP_EXACT | helper.BPFS_OPTIONS):
        assert re.search(rf"(?<![\w=]){re.escape(manpages.escape(opt))}(?![\w=])", text), opt
    for prefix in (*helper.DROP_PREFIXES, *helper.BPFS_VALUE_OPTIONS):
        assert manpages.escape(prefix) in text, prefix
    for flag in "ofvsntNh":  # every flag parse_args knows
        assert f"\\fB\\-{flag}\\fR" in text or f".B \\-{flag}\n" in text, flag
    for code in (helper.EXIT_OK, helper.EXIT_USAGE, helper.EXIT_FAILURE):
        assert f".TP\n.B {code}\n" in text
    for fstype in helper.FS_TYPES:
        assert f"\\fB{manpages.escape(fstype)}\\fR" in text
    assert "BPFS_BIN" in text


def unit_documentation() -> list[tuple[str, str]]:
    """(unit file, URI) of every Documentation= in packaging/systemd."""
    found = []
    for unit in sorted(UNITS.iterdir()):
        for ln in unit.read_text().splitlines():
            if ln.startswith("Documentation="):
                found += [(unit.name, uri) for uri in ln.split("=", 1)[1].split()]
    return found


def test_units_documentation_names_pages_that_are_installed(pages):
    docs = unit_documentation()
    assert {unit for unit, _ in docs} == {u.name for u in UNITS.iterdir()}, "a unit without Documentation="
    written = set(pages) | {HANDWRITTEN.name}
    for unit, uri in docs:
        m = re.fullmatch(r"man:([\w.@-]+)\((\d)\)", uri)
        if m:
            assert f"{m[1]}.{m[2]}" in written, f"{unit}: {uri} is not a page bpfs has"
        else:
            # the Debian package's documentation: the user README (bpfs.docs), kept uncompressed
            assert uri == "file:///usr/share/doc/bpfs/README.md", f"{unit}: {uri}"
            assert "README.md" in (REPO / "packaging/debian/bpfs.docs").read_text().split()
    first = {}
    for unit, uri in docs:
        first.setdefault(unit, uri)
    assert first.items() >= {
        "bpfs-broker.service": "man:bpfs-broker(1)", "bpfs-serve@.service": "man:bpfs-serve(1)",
        "home-alice-Backup.automount": "man:mount.bpfs(8)", "home-alice-Backup.mount": "man:mount.bpfs(8)",
    }.items()


def test_debian_package_builds_and_installs_the_pages():
    rules = (REPO / "packaging/debian/rules").read_text()
    assert "-m bpfs.cli.manpages build/man" in rules
    listed = (REPO / "packaging/debian/bpfs.manpages").read_text().split()
    assert listed == ["build/man/*.1", "packaging/man/mount.bpfs.8"]
    assert (REPO / listed[1]).is_file()
    assert (REPO / "packaging/debian/bpfs.docs").read_text().split() == ["README.md"]


def test_make_man_writes_every_page(pages, tmp_path):
    out = tmp_path / "man"
    # -o: the venv and the system packages are taken as they are (no pip, no apt-get from a test)
    cp = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "-o", "deps", "-o", ".venv/.bpfs-installed",
                         "man", f"MAN_BUILD={out}"], capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([*pages, HANDWRITTEN.name])
    for name, text in pages.items():
        assert (out / name).read_text() == text
