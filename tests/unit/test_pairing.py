"""Pairing codes and the SPAKE2 exchange (bpfs.rendezvous.pairing), without a network.

The network side (a real broker, real daemons, a broker that swaps the exchange) is in
test_rendezvous.py; these pin down the pieces it relies on.
"""

from __future__ import annotations

import pytest

from bpfs.rendezvous.pairing import (CREATOR, JOINER, Decision, Exchange, Intro, PairingError, WrongCode,
                                     make_code, parse_code)
from bpfs.rendezvous.words import WORDS


def run_exchange(code_a: str, code_b: str) -> tuple[Exchange, Exchange]:
    a, b = Exchange(code_a, CREATOR), Exchange(code_b, JOINER)
    a.finish(b.message)
    b.finish(a.message)
    return a, b


def test_codes_are_a_number_and_words_and_parse_back():
    codes = {make_code(7) for _ in range(200)}
    assert len(codes) > 150  # random words
    for code in codes:
        number, *words = code.split("-")
        assert number == "7" and len(words) == 3 and all(w in WORDS for w in words)
        assert parse_code(code) == (7, code)
        assert parse_code(f"  {code.upper()} ") == (7, code)  # typed loosely
    assert len(make_code(12, words=4).split("-")) == 5
    for bad in ("", "7", "7-", "x-acid-acid", "0-acid-acid", "7-acid", "7-acid-notaword", "7-acid-acid-acid-acid-acid"):
        with pytest.raises(PairingError) as e:
            parse_code(bad)
        assert e.value.exit_code == 2


def test_a_code_with_unknown_words_names_them():
    """`12-zzzz-yyyy` has the form of a code: the error says which words are not code words."""
    for text, named, not_named in (("12-zzzz-yyyy", ["'zzzz'", "'yyyy'"], []),
                                   ("12-acid-yyyy-acorn", ["'yyyy'"], ["acid", "acorn"]),
                                   ("12-Acid-Acorn-Zzzz", ["'zzzz'"], ["acorn"])):
        with pytest.raises(PairingError) as e:
            parse_code(text)
        msg = str(e.value)
        assert e.value.exit_code == 2 and "not in the list of code words" in msg, msg
        assert all(w in msg for w in named) and not any(f"'{w}'" in msg for w in not_named), msg
        assert "expected NUMBER-WORD" not in msg, msg
    with pytest.raises(PairingError) as e:
        parse_code("12-acid-acorn")
    assert "has 2 words" in str(e.value), str(e.value)


def test_same_code_same_keys_both_ways():
    a, b = run_exchange("7-acid-acorn", "7-acid-acorn")
    assert a.pair_key == b.pair_key and len(a.pair_key) == 32
    intro = b.open(a.seal(Intro(b"k" * 32, 5, 6)), Intro)
    assert (intro.public_key, intro.offer, intro.ask) == (b"k" * 32, 5, 6)
    assert a.open(b.seal(Decision(True, "")), Decision).accept is True
    # a message cannot be reflected back to its sender (each side seals with its own key)
    with pytest.raises(WrongCode):
        a.open(a.seal(Decision(True, "")), Decision)
    # another run with the same code gives other keys (fresh SPAKE2 scalars)
    c, d = run_exchange("7-acid-acorn", "7-acid-acorn")
    assert c.pair_key != a.pair_key


def test_different_codes_fail_on_both_sides():
    a, b = run_exchange("7-acid-acorn", "7-acid-actor")
    assert a.pair_key != b.pair_key
    with pytest.raises(WrongCode):
        b.open(a.seal(Intro(b"k" * 32, 1, 1)), Intro)
    with pytest.raises(WrongCode):
        a.open(b.seal(Intro(b"k" * 32, 1, 1)), Intro)


def test_tampering_and_garbage_are_refused():
    a, b = run_exchange("9-amber-angel", "9-amber-angel")
    sealed = bytearray(a.seal(Intro(b"k" * 32, 1, 1)))
    sealed[30] ^= 1
    with pytest.raises(WrongCode):
        b.open(bytes(sealed), Intro)
    with pytest.raises(WrongCode):
        b.open(b"short", Intro)
    with pytest.raises(PairingError):  # the right key, the wrong message type
        b.open(a.seal(Decision(False, "no")), Intro)
    # a broker echoing our own SPAKE2 message back, or sending garbage, is refused
    e = Exchange("9-amber-angel", CREATOR)
    with pytest.raises(PairingError):
        e.finish(e.message)
    with pytest.raises(PairingError):
        Exchange("9-amber-angel", JOINER).finish(b"\x00" * 33)
