"""Client certificate subjects as distinguished names: the one form mTLS identities match on.

A subject is compared as its parsed RDN sequence, never as text that could be read two ways. gRPC
reports a verified client certificate's subject (`auth_context()["x509_subject"]`) as an RFC 4514
string: OpenSSL's `X509_NAME_print_ex` with `XN_FLAG_RFC2253`, the most specific RDN first
(`CN=team-a,O=Org`), with `,+"\\<>;` inside a value escaped by a backslash and non-ASCII bytes as
`\\XX` pairs. So a certificate whose common name is the literal text `team-a,O=Org` is reported
as `CN=team-a\\,O=Org`: one RDN, and `parse` tells it from the two RDNs `CN=team-a,O=Org`.

The auth file's `client_subject` is parsed by the same function, so a configured subject matches a
certificate exactly when both name the same attributes with the same values in the same order
(attribute types case-insensitively, values exactly). Configured text that an RFC 4514 reader and
a more lenient one could read differently is refused at load (`SubjectError`): spaces around a
separator or at either end of a value unescaped, `;` (RFC 1779's other separator), an RDN without
`=`, OpenSSL's slash form (`/O=Org/CN=team-a`). The string to write is what
`openssl x509 -noout -subject -nameopt RFC2253 -in client.pem` prints after `subject=`.
"""

from __future__ import annotations

import functools
import re

# One attribute: (type, value). A type is an upper-cased keyword (`CN`, `EMAILADDRESS`) or a dotted
# OID; a value is `str`, or `bytes` for the `#hex` form (a DER value OpenSSL could not print as
# text), so the string `\#ab` and the DER `#ab` never compare equal.
Attribute = tuple[str, "str | bytes"]
# One RDN: its attributes sorted (a multi-valued RDN `A=1+B=2` is a set). A name: RDNs in string order.
Name = tuple[tuple[Attribute, ...], ...]

_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+")
_ESCAPABLE = ' "#+,;<=>\\'
_FORBIDDEN = '"+,;<>\\'  # not allowed unescaped inside a value (RFC 4514 section 3)
_HEX = "0123456789abcdefABCDEF"


class SubjectError(ValueError):
    """Text that is not one unambiguous RFC 4514 subject; the message says what and where."""


def parse(text: str) -> Name:
    """The RDN sequence of RFC 4514 `text` (`CN=team-a,O=Org` -> `((("CN", "team-a"),), (("O", "Org"),))`).

    Raises SubjectError for anything but the strict form: no spaces around `,` `+` `=` or at a
    value's ends unless escaped (`\\ `), escapes only of special characters or as hex pairs."""
    if not text:
        raise SubjectError("empty; expected attributes such as CN=team-a")
    rdns: list[tuple[Attribute, ...]] = []
    attrs: list[Attribute] = []
    i, n = 0, len(text)
    while True:
        eq = _unescaped(text, "=", i)
        if eq < 0:
            raise SubjectError(f"{text[i:]!r} has no '='; expected type=value (CN=team-a)")
        kind = text[i:eq]
        if not _TYPE.fullmatch(kind):
            raise SubjectError(
                f"attribute type {kind!r}; expected a keyword such as CN or O, or a dotted OID, with no "
                "spaces around it" + (" (the slash form is OpenSSL's; use -nameopt RFC2253)" if "/" in kind else "")
            )
        value, i = _value(text, eq + 1)
        attrs.append((kind.upper(), value))
        if i == n or text[i] == ",":
            if len({a for a, _ in attrs}) != len(attrs):
                raise SubjectError(f"an RDN names {attrs[0][0]} twice with '+'; expected each type once in an RDN")
            rdns.append(tuple(sorted(attrs, key=repr)))
            attrs = []
        if i == n:
            return tuple(rdns)
        i += 1  # past ',' or '+'
        if i == n:
            raise SubjectError("ends with a separator; expected another type=value after it")


def _unescaped(text: str, char: str, start: int) -> int:
    """Index of the first `char` at or after `start` not escaped by a backslash; -1 if none."""
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == char:
            return i
        if text[i] in ",+":  # the RDN ended before any '='
            return -1
        i += 1
    return -1


def _value(text: str, i: int) -> tuple[str | bytes, int]:
    """The value starting at `text[i]` and the index of the separator (or end) after it."""
    n = len(text)
    if i < n and text[i] == "#":  # hex of a DER value
        j = i + 1
        while j < n and text[j] in _HEX:
            j += 1
        if j == i + 1 or (j - i - 1) % 2 or (j < n and text[j] not in ",+"):
            raise SubjectError(
                f"value {text[i:j + 1]!r}; expected '#' and pairs of hex digits, or '\\#' for a literal '#'"
            )
        return bytes.fromhex(text[i + 1 : j]), j
    out = bytearray()
    start = i
    while i < n and text[i] not in ",+":
        c = text[i]
        if c == "\\":
            pair = text[i + 1 : i + 3]
            if len(pair) == 2 and all(h in _HEX for h in pair):
                out += bytes.fromhex(pair)
                i += 3
                continue
            if i + 1 < n and text[i + 1] in _ESCAPABLE:
                out += text[i + 1].encode()
                i += 2
                continue
            raise SubjectError(
                f"escape {text[i:i + 2]!r}; expected a backslash before one of {_ESCAPABLE!r} or two hex digits"
            )
        if c in _FORBIDDEN or (c == "=" and i == start):
            raise SubjectError(f"{c!r} unescaped in value {text[start:i + 1]!r}...; expected it escaped as '\\{c}'")
        if c == " " and (i == start or i + 1 == n or text[i + 1] in ",+"):
            raise SubjectError(
                f"a space at an end of value {text[start:i + 1]!r}; expected none around separators "
                "(or '\\ ' for a space that belongs to the value)"
            )
        out += c.encode()
        i += 1
    if i == start:
        raise SubjectError(f"empty value at {text[:start]!r}; expected type=value")
    try:
        return out.decode("utf-8"), i
    except UnicodeDecodeError:
        raise SubjectError(f"value {text[start:i]!r}: its \\XX pairs are not UTF-8; expected UTF-8") from None


@functools.lru_cache(maxsize=1024)
def reported(text: str) -> Name | None:
    """The name of a subject as gRPC reported it for a verified certificate; None if it does not
    parse (then it matches no configured subject). Cached: the same few clients call again and again."""
    try:
        return parse(text)
    except SubjectError:
        return None


def describe(name: Name) -> str:
    """`name` back as strict RFC 4514 text (for logs and messages)."""

    def value(v: str | bytes) -> str:
        if isinstance(v, bytes):
            return "#" + v.hex()
        out = "".join("\\" + c if c in '"+,;<>\\=' else c for c in v)
        if out.startswith((" ", "#")):
            out = "\\" + out
        if out.endswith(" ") and len(out) > 1:
            out = out[:-1] + "\\ "
        return out

    return ",".join("+".join(f"{t}={value(v)}" for t, v in rdn) for rdn in name)
