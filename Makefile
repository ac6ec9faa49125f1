# bpfs developer entry points.
#
#   make deps     install the Debian packages bpfs needs (as root; quick no-op when present)
#   make venv     create .venv and `pip install -e '.[test]'` (redone when pyproject.toml changes)
#   make mount    create a store if needed, then mount it   (STORE=..., MNT=..., LISTEN=HOST:PORT|none)
#   make umount   unmount $(MNT)
#   make test     lint (ruff, mypy), then run the test suite   (PYTEST_ARGS=...)
#   make bench    run the benchmarks                          (BENCH_ARGS=...; installs '.[bench]')
#   make clean    remove build/test artefacts (keeps .venv);  make distclean also removes .venv
#   make man      write the man pages into build/man: bpfs(1), bpfs-COMMAND(1), ...   (MAN_BUILD=...)
#   make install  bpfs for the whole system: $(PREFIX)/lib/bpfs, $(PREFIX)/bin, $(SBINDIR)/mount.bpfs,
#                 man pages in $(MANDIR) (PREFIX=/usr/local, SBINDIR=/sbin, DESTDIR= to stage);
#                 make uninstall removes it
#
# The store is never touched by clean/distclean.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
STORE       ?= $(HOME)/.local/share/bpfs/store
MNT         ?= $(HOME)/bpfs
LISTEN      ?=
PYTEST_ARGS ?=
BENCH_ARGS  ?=
PIP_ARGS    ?= --progress-bar off
# make install: where bpfs goes (a virtualenv in $(PREFIX)/lib/bpfs, links in $(PREFIX)/bin, the
# mount(8) helper in $(SBINDIR)); DESTDIR stages the tree elsewhere (for packaging). Its Python:
# the system's /usr/bin/python3 when it is >= 3.11 with venv (a Python under a user's home would
# leave other users unable to run bpfs), else $(PYTHON).
PREFIX      ?= /usr/local
SBINDIR     ?= /sbin
MANDIR      ?= $(PREFIX)/share/man
DESTDIR     ?=
# make man: the pages generated from the click definitions (bpfs.cli.manpages), and the hand-written
# mount.bpfs(8).
MAN_BUILD   ?= build/man
MAN_PAGES_HANDWRITTEN := packaging/man/mount.bpfs.8
INSTALL_PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo /usr/bin/python3 || echo $(PYTHON))

VPY   := $(VENV)/bin/python
BPFS  := $(abspath $(VENV))/bin/bpfs
STAMP := $(VENV)/.bpfs-installed
BENCH_STAMP := $(VENV)/.bpfs-bench-installed

# Debian packages: FUSE runtime + headers (pyfuse3 is built from source), a compiler,
# and the tools the tests/benchmarks compare against or use (iproute2, iptables: the tests'
# network namespaces with loss and partitions), and groff-base (the tests render the man pages).
DEB_PKGS := fuse3 libfuse3-dev pkg-config gcc rsync sqlite3 attr acl gocryptfs restic iproute2 iptables groff-base
# Only for `make bench`: the rsync-over-ssh reference runs a private sshd on 127.0.0.1 (see
# bench/replication/). Debian starts the system's sshd when it installs the package; a
# copy installed here is stopped and disabled again, so benchmarking opens no port 22.
BENCH_PKGS := openssh-server

.PHONY: help deps bench-deps venv mount umount test bench man install uninstall clean distclean

help:
	@sed -n '3,14s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

# ---------------------------------------------------------------- deps
deps:
	@if ! command -v dpkg-query >/dev/null 2>&1; then
	  echo "deps: no dpkg-query (not a Debian-like system); make sure these are installed:" >&2
	  echo "deps:   $(DEB_PKGS), Python >= 3.11 headers and venv support" >&2
	  exit 0
	fi
	missing=""
	for p in $(DEB_PKGS); do
	  if ! dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q ' installed$$'; then
	    missing="$$missing $$p"
	  fi
	done
	# Python headers (pyfuse3 compiles a C extension) and venv/ensurepip for $(PYTHON).
	if ! $(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
	  missing="$$missing python3-dev"
	fi
	if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then
	  missing="$$missing python3-venv"
	fi
	if [ -z "$$missing" ]; then
	  exit 0
	fi
	if [ "$$(id -u)" -ne 0 ]; then
	  echo "deps: missing system packages:$$missing" >&2
	  echo "deps: install them as root, e.g.:  sudo apt-get install -y$$missing" >&2
	  exit 1
	fi
	echo "deps: installing:$$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update
	apt-get install -y --no-install-recommends $$missing

# ---------------------------------------------------------------- venv
venv: $(STAMP)

# Re-run when pyproject.toml changes, and once more when bpfs/__init__.py first appears
# (an editable install made before the package existed does not map it); and when the C
# extension (the chunker, bpfs/_gearcdc.c) changes: the editable install builds it in place.
$(STAMP): pyproject.toml setup.py bpfs/_gearcdc.c $(wildcard bpfs/__init__.py) | deps
	@if ! "$(VPY)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
	  if ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
	    echo "venv: $(PYTHON) is $$($(PYTHON) -V 2>&1); bpfs needs Python >= 3.11 (use PYTHON=python3.11)" >&2
	    exit 1
	  fi
	  echo "venv: creating $(VENV) with $$(command -v $(PYTHON)) ($$($(PYTHON) -V 2>&1))"
	  rm -rf -- "$(VENV)"
	  $(PYTHON) -m venv "$(VENV)"
	fi
	if [ ! -f bpfs/__init__.py ]; then
	  echo "venv: warning: bpfs/__init__.py does not exist yet; installing dependencies only" >&2
	fi
	echo "venv: pip install -e '.[test]'"
	"$(VPY)" -m pip install $(PIP_ARGS) -e '.[test]'
	touch "$@"

# ---------------------------------------------------------------- mount / umount
mount: deps venv
	@if findmnt -rn -M "$(MNT)" >/dev/null 2>&1; then
	  if stat -- "$(MNT)" >/dev/null 2>&1; then
	    echo "bpfs: $(MNT) is already mounted ($$(findmnt -rn -o FSTYPE -M "$(MNT)"))"
	    exit 0
	  fi
	  echo "bpfs: $(MNT) is a stale mount (its daemon is gone); clearing it"  # bpfs mount clears it
	else
	  mkdir -p -- "$(MNT)"
	fi
	if [ ! -e "$(STORE)/key.json" ]; then
	  echo "bpfs: no store at $(STORE); creating one"
	  mkdir -p -- "$$(dirname -- "$(STORE)")"
	  if [ -z "$${BPFS_PASSPHRASE:-}" ]; then
	    echo "bpfs: choose the store passphrase (BPFS_PASSPHRASE is not set)"
	  fi
	fi
	# --init: a new store is created by the mount itself, its passphrase asked once (and confirmed)
	# LISTEN: where the daemon serves partners (default: bpfs.toml's listen, else 0.0.0.0:7450; none)
	"$(BPFS)" mount --init "$(STORE)" "$(MNT)" $(if $(LISTEN),--listen "$(LISTEN)")
	echo "bpfs: store $(STORE) is mounted at $(MNT)  (unmount: make umount)"

umount:
	@if ! findmnt -rn -M "$(MNT)" >/dev/null 2>&1; then
	  echo "bpfs: $(MNT) is not mounted"
	  exit 0
	fi
	if [ -x "$(BPFS)" ] && "$(BPFS)" umount "$(MNT)"; then
	  echo "bpfs: unmounted $(MNT)"
	  exit 0
	fi
	echo "bpfs: 'bpfs umount' failed; trying fusermount3 -u $(MNT)" >&2
	fusermount3 -u "$(MNT)"
	echo "bpfs: unmounted $(MNT)"

# ---------------------------------------------------------------- test / bench
test: deps venv
	@echo "test: ruff check (rules in pyproject.toml)"
	"$(VENV)/bin/ruff" check bpfs broker mount_helper tests bench
	echo "test: mypy (settings and files in pyproject.toml)"
	"$(VENV)/bin/mypy"
	echo "test: $(VPY) -m pytest -q $(PYTEST_ARGS)"
	"$(VPY)" -m pytest -q $(PYTEST_ARGS)

bench-deps:
	@if ! command -v dpkg-query >/dev/null 2>&1 || dpkg-query -W -f='$${Status}\n' $(BENCH_PKGS) 2>/dev/null | grep -q ' installed$$'; then
	  exit 0
	fi
	if [ "$$(id -u)" -ne 0 ]; then
	  echo "bench-deps: missing $(BENCH_PKGS) (the rsync-over-ssh reference is skipped without it)" >&2
	  exit 0
	fi
	echo "bench-deps: installing $(BENCH_PKGS)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends $(BENCH_PKGS) || { apt-get update && apt-get install -y --no-install-recommends $(BENCH_PKGS); }
	if command -v systemctl >/dev/null 2>&1; then systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true; fi
	if command -v service >/dev/null 2>&1; then service ssh stop >/dev/null 2>&1 || true; fi

# The benchmarks' own Python dependencies (numpy): only `make bench` installs them, so
# `make venv` and `make test` stay as they are. Redone when the venv is (re)installed.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	@echo "bench: pip install -e '.[test,bench]'"
	"$(VPY)" -m pip install $(PIP_ARGS) -e '.[test,bench]'
	touch "$@"

bench: deps venv bench-deps $(BENCH_STAMP)
	@echo "bench: $(VPY) -m bench $(BENCH_ARGS)"
	"$(VPY)" -m bench $(BENCH_ARGS)

# ---------------------------------------------------------------- man
# -I: the bpfs of the Python that runs it (not ./bpfs by way of the current folder); -B: no byte code.
man: venv
	@rm -rf -- "$(MAN_BUILD)"
	"$(VPY)" -I -B -m bpfs.cli.manpages "$(MAN_BUILD)"
	install -m 644 $(MAN_PAGES_HANDWRITTEN) "$(MAN_BUILD)/"
	echo "man: pages in $(MAN_BUILD) (read one with: man -l $(MAN_BUILD)/bpfs.1)"

# ---------------------------------------------------------------- install / uninstall
# A virtualenv is not relocatable: it is built where DESTDIR puts it, then its scripts are pointed
# at $(PREFIX)/lib/bpfs (as packaging/debian/rules does for /opt/bpfs). The links in $(PREFIX)/bin
# are relative, and the helper knows where bpfs is (INSTALLED_BPFS in mount_helper/mount.bpfs).
install: deps
	@case "$(PREFIX)" in /*) ;; *) echo "install: PREFIX must be an absolute path, not $(PREFIX)" >&2; exit 1;; esac
	case "$(SBINDIR)" in /*) ;; *) echo "install: SBINDIR must be an absolute path, not $(SBINDIR)" >&2; exit 1;; esac
	case "$(MANDIR)" in /*) ;; *) echo "install: MANDIR must be an absolute path, not $(MANDIR)" >&2; exit 1;; esac
	if ! $(INSTALL_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
	  echo "install: $(INSTALL_PYTHON) is $$($(INSTALL_PYTHON) -V 2>&1); bpfs needs Python >= 3.11 (INSTALL_PYTHON=...)" >&2
	  exit 1
	fi
	lib="$(PREFIX)/lib/bpfs"
	venv="$(DESTDIR)$$lib"
	echo "install: bpfs into $$venv (a virtualenv of $$(command -v $(INSTALL_PYTHON)))"
	rm -rf -- "$$venv"
	$(INSTALL_PYTHON) -m venv "$$venv"
	"$$venv/bin/python" -m pip install $(PIP_ARGS) --no-compile --disable-pip-version-check .
	if [ "$$venv" != "$$lib" ]; then
	  grep -rlI --null -F "$$venv" "$$venv" | xargs -0r sed -i "s|$$venv|$$lib|g"
	fi
	rm -f "$$venv/bin/activate.csh" "$$venv/bin/activate.fish" "$$venv/bin/Activate.ps1"
	install -d "$(DESTDIR)$(PREFIX)/bin" "$(DESTDIR)$(SBINDIR)"
	for prog in bpfs bpfs-broker; do
	  ln -sfn "../lib/bpfs/bin/$$prog" "$(DESTDIR)$(PREFIX)/bin/$$prog"
	done
	helper="$(DESTDIR)$(SBINDIR)/mount.bpfs"
	sed 's|^INSTALLED_BPFS = None .*|INSTALLED_BPFS = "$(PREFIX)/bin/bpfs"  # written by make install|' \
	  mount_helper/mount.bpfs > "$$helper.tmp"
	grep -q '^INSTALLED_BPFS = "' "$$helper.tmp" || { echo "install: cannot set INSTALLED_BPFS in mount.bpfs" >&2; exit 1; }
	chmod 755 "$$helper.tmp"
	mv -f "$$helper.tmp" "$$helper"
	# The man pages, generated by the bpfs just installed (as `make man` does), and mount.bpfs(8).
	man="$(DESTDIR)$(MANDIR)"
	install -d "$$man/man1" "$$man/man8"
	rm -f -- "$$man/man1/bpfs.1" "$$man"/man1/bpfs-*.1
	"$$venv/bin/python" -I -B -m bpfs.cli.manpages "$$man/man1" >/dev/null
	install -m 644 $(MAN_PAGES_HANDWRITTEN) "$$man/man8/"
	echo "install: $(DESTDIR)$(PREFIX)/bin/bpfs, $(DESTDIR)$(PREFIX)/bin/bpfs-broker and $$helper (mount -t bpfs)"
	echo "install: man pages in $$man/man1 and $$man/man8 (man bpfs)"

uninstall:
	@rm -rf -- "$(DESTDIR)$(PREFIX)/lib/bpfs"
	rm -f -- "$(DESTDIR)$(PREFIX)/bin/bpfs" "$(DESTDIR)$(PREFIX)/bin/bpfs-broker" "$(DESTDIR)$(SBINDIR)/mount.bpfs"
	rm -f -- "$(DESTDIR)$(MANDIR)/man1/bpfs.1" "$(DESTDIR)$(MANDIR)"/man1/bpfs-*.1 \
	  "$(DESTDIR)$(MANDIR)/man8/mount.bpfs.8"
	echo "uninstall: removed bpfs from $(DESTDIR)$(PREFIX) (with its man pages) and $(DESTDIR)$(SBINDIR)/mount.bpfs"

# ---------------------------------------------------------------- clean
clean:
	rm -rf build dist .pytest_cache .hypothesis ./*.egg-info "$(STAMP)" "$(BENCH_STAMP)"
	find . -path "./$(VENV)" -prune -o -path ./.git -prune -o -type d -name __pycache__ -print0 | xargs -0r rm -rf

distclean: clean
	rm -rf -- "$(VENV)"
