"""DKIM signatures on the composed mails (RFC 6376, ed25519 RFC 8463): keys, signing, keygen, check."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from .config import Campaign
from .errors import ConfigError, Problem

__all__ = [
    "SIGNED",
    "DkimLine",
    "Key",
    "Signer",
    "check_dkim",
    "keygen",
    "load_signer",
    "txt_name",
    "txt_record",
    "txt_strings",
]

#: The header fields each signature covers, when present (RFC 6376 5.4.1; RFC 8058 4: the
#: List-Unsubscribe and List-Unsubscribe-Post fields MUST be signed). Each is listed once more
#: than it occurs ("over-signing", RFC 6376 5.4.2 and 8.15): an added From, Subject or
#: List-Unsubscribe, or one added where there was none (a Reply-To), breaks the signature.
SIGNED = (
    "from",
    "reply-to",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "list-unsubscribe",
    "list-unsubscribe-post",
)

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
ENV_KEY = {"rsa-sha256": "MAILER_DKIM_KEY", "ed25519-sha256": "MAILER_DKIM_ED25519_KEY"}
_DNS_NAME = "_domainkey"


@dataclass(frozen=True)
class Key:
    """One signing key: what ``d=``/``s=`` name it and its private key (picklable bytes: PEM
    for RSA, the 32-byte seed for ed25519). ``source`` says where it was read, for messages."""

    selector: str
    domain: str
    algorithm: Algorithm
    private: bytes = field(repr=False)
    source: str = ""

    def loaded(self) -> Any:
        """The ``cryptography`` private key object."""
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if self.algorithm == "ed25519-sha256":
            return ed25519.Ed25519PrivateKey.from_private_bytes(self.private)
        return load_pem_private_key(self.private, password=None)

    def public_b64(self) -> str:
        """The ``p=`` of the key's DNS record: SubjectPublicKeyInfo DER (RSA, RFC 6376 3.6.1),
        the raw 32-byte key (ed25519, RFC 8463 4.2), base64."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        pub = self.loaded().public_key()
        if self.algorithm == "ed25519-sha256":
            raw = pub.public_bytes(Encoding.Raw, PublicFormat.Raw)
        else:
            raw = pub.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(raw).decode("ascii")

    @property
    def bits(self) -> int:
        return 256 if self.algorithm == "ed25519-sha256" else int(self.loaded().key_size)


def txt_name(selector: str, domain: str) -> str:
    """Where the public key is published: ``selector._domainkey.domain``."""
    return f"{selector}.{_DNS_NAME}.{domain}"


def txt_record(key: Key) -> str:
    """The TXT record's value (one string, before splitting)."""
    k = "ed25519" if key.algorithm == "ed25519-sha256" else "rsa"
    return f"v=DKIM1; k={k}; p={key.public_b64()}"


def txt_strings(value: str) -> str:
    """``value`` as DNS character-strings of at most 255 octets (RFC 1035 3.3; RFC 6376 3.6.2.2:
    a verifier joins them without spaces): ``"..." "..."``."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


# --------------------------------------------------------------------------------------
# Signing. dkimpy's own DKIM.sign() takes t= from the wall clock, and its pure-Python RSA
# costs ~10 ms a mail. So this adapter builds the signature from dkimpy's parts (its header
# parser, relaxed canonicalization, header selection and folding: the very code its verify()
# uses) with t= from the claimed row, and signs with `cryptography`. These are dkimpy
# internals: pyproject pins dkimpy>=1.1,<1.2, the range tests/test_dkim.py verifies against.
# --------------------------------------------------------------------------------------


class Signer:
    """Adds one DKIM-Signature per key to a composed mail. Picklable (the composing worker
    gets one); the parsed keys are built on first use in each process."""

    def __init__(self, keys: tuple[Key, ...]) -> None:
        if not keys:
            raise ValueError("a Signer needs a key")
        self.keys = keys
        self._loaded: list[Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"keys": self.keys, "_loaded": None}

    def sign(self, message: bytes, when: datetime) -> bytes:
        """``message`` (CRLF bytes, as :func:`mailer.message.build` writes them) with a
        DKIM-Signature per key on top. ``when`` (aware) is ``t=``: the claimed row's time, the
        mail's Date, never the clock, so a re-send after a crash is byte-identical.

        The header block :func:`mailer.message.build` writes is canonicalized here without
        dkimpy's regular expressions (:func:`_relaxed_headers`), once for all keys; anything
        else goes the dkimpy way (:meth:`_sign_dkimpy`). Both give the same bytes (tests)."""
        end = message.find(b"\r\n\r\n")
        found = _relaxed_headers(message[: end + 2]) if end > 0 else None
        if found is None:
            return self._sign_dkimpy(message, when)
        import dkim as dkimpy

        if self._loaded is None:
            self._loaded = [k.loaded() for k in self.keys]
        body = message[end + 4 :]
        canon_body = _relaxed_body(body)
        if canon_body is None:
            canon_body = dkimpy.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed").canonicalize_body(
                body
            )
        # What dkimpy's select_headers() picks for h=: each name in SIGNED order, listed once
        # more than it occurs, its fields from the last one up.
        signed = b"".join(b"".join(reversed(found[n])) for n in _SIGNED_B if n in found)
        include = b" : ".join(n for n in _SIGNED_B for _ in range(len(found.get(n, ())) + 1))
        return self._add_signatures(message, when, canon_body, include, signed)

    def _add_signatures(
        self, message: bytes, when: datetime, canon_body: bytes, include: bytes, signed: bytes
    ) -> bytes:
        """One DKIM-Signature per key on top of ``message``: ``signed`` is the relaxed form of
        the signed fields in h= order (``include``: h='s value)."""
        import dkim as dkimpy

        assert self._loaded is not None
        body_hash = base64.b64encode(hashlib.sha256(canon_body).digest())
        stamp = str(int(when.timestamp())).encode("ascii")
        out = []
        for key, pk in zip(self.keys, self._loaded, strict=True):
            fields = [
                (b"v", b"1"),
                (b"a", key.algorithm.encode()),
                (b"c", b"relaxed/relaxed"),
                (b"d", key.domain.encode()),
                (b"s", key.selector.encode()),
                (b"t", stamp),
                (b"h", include),  # spaces: fold() breaks lines only there
                (b"bh", body_hash),
                (b"b", b"0" * 60),
            ]
            # As dkimpy's sign()/gen_header(): fold with a placeholder b= (hash_headers() empties
            # it), hash the signed fields and this header, fold again with the signature.
            value = dkimpy.fold(b"; ".join(b"=".join(f) for f in fields), namelen=14)
            h = hashlib.sha256(signed)
            h.update(_relaxed_signature_field(value))
            fields[-1] = (b"b", base64.b64encode(_sign_digest(key, pk, h.digest())))
            value = dkimpy.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=14)
            out.append(b"DKIM-Signature: " + value)
        return b"".join(out) + message

    def _sign_dkimpy(self, message: bytes, when: datetime) -> bytes:
        """:meth:`sign` with dkimpy's header parser, relaxed canonicalization and header
        selection (the code its verifier runs): any message, and the reference the fast path is
        tested against."""
        import dkim as dkimpy

        if self._loaded is None:
            self._loaded = [k.loaded() for k in self.keys]
        end = message.find(b"\r\n\r\n")
        if end < 0:
            headers, body = dkimpy.rfc822_parse(message)
        else:  # parse the header block only: the body is canonicalized below
            headers, body = dkimpy.rfc822_parse(message[: end + 4])[0], message[end + 4 :]
        policy = dkimpy.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        canon_headers = policy.canonicalize_headers(headers)
        canon_body = _relaxed_body(body)
        if canon_body is None:
            canon_body = policy.canonicalize_body(body)
        names = [h[0].lower() for h in headers]
        include = tuple(n for n in _SIGNED_B for _ in range(names.count(n) + 1))
        signed = b"".join(x + b":" + y for x, y in dkimpy.select_headers(canon_headers, include))
        return self._add_signatures(message, when, canon_body, b" : ".join(include), signed)


_SIGNED_B = tuple(n.encode("ascii") for n in SIGNED)
_SIGNED_SET = frozenset(_SIGNED_B)
#: Control characters (tab, VT, FF, ...) but CR and LF, and DEL: a header block or signature
#: field with one of them is canonicalized by dkimpy.
_CONTROL = bytes(c for c in range(0x20) if c not in (0x0A, 0x0D)) + b"\x7f"


#: Where dkimpy's RE_BTAG can match: a "b" after ";" or white space, then white space or "=".
_BTAG_START = re.compile(rb"[;\s]b(?=[\s=])")
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _plain(data: bytes) -> bool:
    """No control character but CR and LF, and those only as CRLF: then unfolding is removing
    the CRLFs, and the only white space is the space (bytes.split() splits on it alone)."""
    crlf = data.count(b"\r\n")
    return (
        data.count(b"\r") == crlf
        and data.count(b"\n") == crlf
        and len(data.translate(None, _CONTROL)) == len(data)
    )


def _relaxed_headers(block: bytes) -> dict[bytes, list[bytes]] | None:
    """The relaxed form (RFC 6376 3.4.2) of the signed fields of a header block as
    :func:`mailer.message.build` writes it (CRLF lines, the last one ending CRLF too,
    continuation lines starting with a space, no tab or other control character): for each name
    of SIGNED present, its fields ``name:value\r\n`` in order (name in lower case, value
    unfolded, each run of spaces one space, none at either end). None: anything else (an empty
    or mbox ``From `` line, a name dkimpy would not read): dkimpy parses and canonicalizes it as
    its verifier would."""
    if not block.endswith(b"\r\n") or not _plain(block):
        return None
    found: dict[bytes, list[bytes]] = {}
    # Unfolding: a CRLF followed by a space goes (the space stays); one field a line.
    for line in block[:-2].replace(b"\r\n ", b" ").split(b"\r\n"):
        colon = line.find(b":")
        raw = line[:colon]
        if colon <= 0 or b" " in raw or not raw.isascii():
            return None
        name = raw.lower()
        if name in _SIGNED_SET:
            canon = name + b":" + b" ".join(line[colon + 1 :].split()) + b"\r\n"
            found.setdefault(name, []).append(canon)
    return found


def _relaxed_signature_field(value: bytes) -> bytes:
    """The relaxed form of ``DKIM-Signature:`` + ``value`` with b= emptied, without the CRLF
    (RFC 6376 3.7), as dkimpy's hash_headers() hashes it."""
    import dkim as dkimpy

    field = b" " + value
    if not _plain(field):
        policy = dkimpy.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        ((name, canon),) = policy.canonicalize_headers(
            [(b"DKIM-Signature", dkimpy.RE_BTAG.sub(b"\\1", field))]
        )
        return bytes(name) + b":" + bytes(canon).rstrip()
    # dkimpy empties every b= tag with RE_BTAG: a match starts at a "b" after ";" or white
    # space. With one such "b" (the b= we add last) only the tail from it needs a look.
    starts = [m.start() for m in _BTAG_START.finditer(field)]
    at = starts[0] if len(starts) == 1 else 0
    tail = field[at + 3 :].replace(b"\r\n ", b"")
    if at and field[at + 1 : at + 3] == b"b=" and not tail.translate(None, _BASE64):
        emptied = field[: at + 3]  # what RE_BTAG leaves of a b= tag at the end: "b="
    else:
        emptied = field[:at] + dkimpy.RE_BTAG.sub(b"\\1", field[at:])
    return b"dkim-signature:" + b" ".join(emptied.replace(b"\r\n", b"").split())


def _relaxed_body(body: bytes) -> bytes | None:
    """The relaxed body (RFC 6376 3.4.4) of what :func:`mailer.message.build` writes, cheaper
    than dkimpy's per-line regular expressions: with CRLF line ends only, runs of spaces and
    tabs become one space (one pass, and only where there are any: the shipped HTML indents its
    <style>), a space before a line end goes, and the trailing empty lines are dropped. None:
    anything else (bare CR or LF, an empty body, white space at its very end without a line
    end: dkimpy canonicalizes it)."""
    if not body or body.endswith((b" ", b"\t")):
        return None
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        return None
    if b"\t" in body:  # a tab is white space as a space is; runs of both become one space
        body = body.replace(b"\t", b" ")
    if b"  " in body:
        body = _SPACE_RUN.sub(b" ", body)  # ~20x cheaper than one regex over spaces and tabs
    if b" \r\n" in body:
        body = body.replace(b" \r\n", b"\r\n")
    stripped = body.rstrip(b"\r\n")
    return stripped + b"\r\n" if stripped else None


#: Two or more spaces (tabs are spaces by then).
_SPACE_RUN = re.compile(rb"  +")


def _sign_digest(key: Key, pk: Any, digest: bytes) -> bytes:
    if key.algorithm == "ed25519-sha256":
        return bytes(pk.sign(digest))  # RFC 8463 3: ed25519 over the SHA-256 hash
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    return bytes(pk.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())))


# --------------------------------------------------------------------------------------
# Loading the keys (the only part that reads the environment and files).
# --------------------------------------------------------------------------------------


def load_signer(campaign: Campaign, environ: Mapping[str, str]) -> Signer | None:
    """The campaign's signer (None without ``dkim:``).

    The RSA key comes from ``MAILER_DKIM_KEY`` (PEM text), else ``MAILER_DKIM_KEY_FILE``,
    else ``dkim.key_file``; the ed25519 key (with ``dkim.ed25519_selector``) likewise from
    ``MAILER_DKIM_ED25519_KEY``/``_FILE``/``ed25519_key_file``.

    :raises ConfigError: a key is missing, unreadable, open to others or not a key.
    """
    d = campaign.dkim
    if d is None:
        return None
    cfg = campaign.config_path.name
    keys = [_load_key(d.selector, d.domain, "rsa-sha256", d.key_file, environ, cfg)]
    if d.ed25519_selector:
        keys.append(
            _load_key(d.ed25519_selector, d.domain, "ed25519-sha256", d.ed25519_key_file, environ, cfg)
        )
    return Signer(tuple(keys))


def _load_key(
    selector: str, domain: str, alg: Algorithm, key_file: Path | None, environ: Mapping[str, str], cfg: str
) -> Key:
    env = ENV_KEY[alg]
    what = "ed25519_key_file" if alg == "ed25519-sha256" else "key_file"

    def fail(where: str, msg: str) -> ConfigError:
        return ConfigError([Problem(where, msg, field=f"dkim.{what}" if where == cfg else "")])

    if environ.get(env):
        source, data = env, environ[env].encode()
    else:
        path = Path(environ[f"{env}_FILE"]) if environ.get(f"{env}_FILE") else key_file
        if path is None:
            raise fail(
                cfg,
                f"dkim: no {'ed25519 ' if alg == 'ed25519-sha256' else ''}private key: set dkim.{what} "
                f"or {env} / {env}_FILE (`mailer dkim keygen` makes one)",
            )
        source = str(path)
        try:
            st = path.stat()
            if st.st_mode & 0o077:
                raise fail(
                    source,
                    f"the DKIM private key is open to group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
                    f"run `chmod 600 {path}`",
                )
            data = path.read_bytes()
        except OSError as exc:
            raise fail(
                source, f"cannot read the DKIM private key ({exc.strerror}); check dkim.{what}"
            ) from None
    try:
        private = _parse_private(data, alg)
    except ValueError as exc:
        raise fail(
            source,
            f"not a usable {alg.split('-')[0]} private key ({exc}); `mailer dkim keygen` writes one",
        ) from None
    return Key(selector, domain, alg, private, source)


def _parse_private(data: bytes, alg: Algorithm) -> bytes:
    """The key in the form :class:`Key` keeps: RSA as PEM (checked, >= 1024 bits); ed25519 as its
    32-byte seed, read from PEM (PKCS#8) or dkimpy's base64 seed (``dknewkey`` files)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        load_pem_private_key,
    )

    text = data.strip()
    if alg == "ed25519-sha256" and not text.startswith(b"-----"):
        try:
            seed = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError("neither PEM nor a base64 ed25519 seed") from None
        if len(seed) != 32:
            raise ValueError(f"a base64 ed25519 seed is 32 bytes, this is {len(seed)}")
        return seed
    try:
        pk = load_pem_private_key(text, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc).split("\n")[0] or "not PEM") from None
    if alg == "ed25519-sha256":
        if not isinstance(pk, ed25519.Ed25519PrivateKey):
            raise ValueError("it is not an ed25519 key")
        return pk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    if not isinstance(pk, rsa.RSAPrivateKey):
        raise ValueError("it is not an RSA key")
    if pk.key_size < 1024:  # RFC 8301 3.2: verifiers reject shorter keys
        raise ValueError(f"{pk.key_size} bits; receivers want at least 1024, 2048 is usual")
    return pk.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption())


# --------------------------------------------------------------------------------------
# keygen
# --------------------------------------------------------------------------------------


def keygen(
    selector: str, domain: str, out: Path, *, ed25519: bool = False, bits: int = 2048, force: bool = False
) -> Key:
    """Write a new private key to ``out`` with mode 0600 (created so, never readable by others
    in between) and return it (:func:`txt_record` gives what to publish).

    :raises ConfigError: ``out`` exists and ``force`` is not set.
    """
    from cryptography.hazmat.primitives.asymmetric import ed25519 as ed
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    if out.exists() and not force:
        raise ConfigError([Problem(str(out), "exists; choose another --out, or add --force to replace it")])
    if ed25519:
        seed = ed.Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        key = Key(selector, domain, "ed25519-sha256", seed, str(out))
        text = base64.b64encode(seed) + b"\n"  # dkimpy's format (dknewkey)
    else:
        pem = rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
            Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption()
        )
        key, text = Key(selector, domain, "rsa-sha256", pem, str(out)), pem
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask, and an old .tmp keeps its mode
        os.write(fd, text)
    finally:
        os.close(fd)
    os.replace(tmp, out)
    return key


# --------------------------------------------------------------------------------------
# For `mailer check`
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DkimLine:
    """One line of the DKIM part of `mailer check`: passed, or what is wrong and what to do."""

    ok: bool
    text: str


DnsFunc = Callable[..., bytes | str | None]

_TEST_MAIL = (
    b"From: <check@{d}>\r\nTo: <check@{d}>\r\nSubject: mailer check\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <check@{d}>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nmailer check: a DKIM test signature\r\n"
)
_TEST_WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def check_dkim(
    campaign: Campaign, environ: Mapping[str, str], *, dns: bool = False, dnsfunc: DnsFunc | None = None
) -> list[DkimLine]:
    """Whether each configured key loads and makes a signature dkimpy verifies against the
    key's own public key; with ``dns``, whether ``selector._domainkey.domain`` publishes that
    key (``dnsfunc``: dkimpy's DNS lookup, ``dnsfunc(name: bytes, timeout=5) -> bytes|None``).
    Empty without ``dkim:`` (the deliverability section says what that means)."""
    if campaign.dkim is None:
        return []
    try:
        signer = load_signer(campaign, environ)
    except ConfigError as exc:
        return [DkimLine(False, f"DKIM: {p}") for p in exc.problems]
    assert signer is not None
    import dkim as dkimpy

    lines = []
    for key in signer.keys:
        what = f"DKIM {key.algorithm} key {key.source} (s={key.selector}, d={key.domain}, {key.bits} bits)"
        record = txt_record(key)
        mail = Signer((key,)).sign(_TEST_MAIL.replace(b"{d}", key.domain.encode()), _TEST_WHEN)
        if not dkimpy.verify(mail, dnsfunc=_serves(record)):
            lines.append(
                DkimLine(
                    False,
                    f"{what}: its own signature does not verify; make a new key with `mailer dkim keygen`",
                )
            )
            continue
        lines.append(DkimLine(True, f"{what} signs; the signature verifies"))
        if dns:
            lines.append(_dns_line(key, record, dnsfunc))
    return lines


def _serves(record: str) -> DnsFunc:
    """A DNS lookup that finds ``record`` at any name: the key's own public key."""

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return record.encode("ascii")

    return lookup


def _dns_line(key: Key, record: str, dnsfunc: DnsFunc | None) -> DkimLine:
    import dkim as dkimpy
    from dkim.util import InvalidTagValueList, parse_tag_value

    name = txt_name(key.selector, key.domain)
    publish = f"publish: {name} IN TXT {txt_strings(record)}"
    lookup = dnsfunc or dkimpy.get_txt
    try:
        found = lookup(name.encode("ascii"), timeout=5)
    except Exception as exc:  # noqa: BLE001 - any resolver failure is one line of the report
        return DkimLine(False, f"DKIM DNS: looking up {name} failed ({type(exc).__name__}: {exc}); try again")
    if not found:
        return DkimLine(False, f"DKIM DNS: no TXT record at {name}; {publish}")
    raw = found.encode() if isinstance(found, str) else found
    try:
        tags = parse_tag_value(raw)
    except InvalidTagValueList:
        return DkimLine(False, f"DKIM DNS: the TXT record at {name} is not a DKIM record; {publish}")
    published = b"".join(tags.get(b"p", b"").split()).decode("ascii", "replace")
    if published == key.public_b64():
        return DkimLine(True, f"DKIM DNS: {name} publishes this key")
    if not published:
        return DkimLine(False, f"DKIM DNS: {name} has no key (p= empty: revoked); {publish}")
    return DkimLine(False, f"DKIM DNS: {name} publishes a different key than {key.source}; {publish}")
