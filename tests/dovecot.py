"""A throwaway Dovecot IMAP server on 127.0.0.1 for tests (Debian package dovecot-imapd).

Import the fixture into a test module (``from dovecot import dovecot_fixture``); tests then
take a ``dovecot`` argument. One user with a plain-text password, Maildir storage, IMAP (with STARTTLS) and IMAPS on free
ports, and a certificate from a trustme CA, so clients verify it as they would in production.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

__all__ = ["Dovecot", "dovecot_fixture"]

USER = "organiser"
PASSWORD = "imap-secret-Pa55"  # noqa: S105 - a throwaway test account

_CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
instance_name = mailer-test-{imap_port}
log_path = {log}
info_log_path = {log}
{users}
auth_mechanisms = plain login
auth_failure_delay = 0
disable_plaintext_auth = no
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%u
}}
mail_location = maildir:~/Maildir
ssl = yes
ssl_cert = <{base}/server.pem
ssl_key = <{base}/server.key
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
}}
"""


@dataclass(frozen=True)
class Dovecot:
    """A running server: where it listens, who may log in, and the CA that signed it."""

    host: str
    imap_port: int  # plain IMAP, offers STARTTLS
    imaps_port: int  # implicit TLS
    user: str
    password: str
    ca_file: Path
    maildir: Path  # the user's INBOX on disk
    log: Path

    def env(self, tls: str = "tls") -> dict[str, str]:
        """``MAILER_IMAP_*`` for this server."""
        return {
            "MAILER_IMAP_HOST": self.host,
            "MAILER_IMAP_PORT": str(self.imaps_port if tls == "tls" else self.imap_port),
            "MAILER_IMAP_USER": self.user,
            "MAILER_IMAP_PASSWORD": self.password,
            "MAILER_IMAP_TLS": tls,
            "MAILER_IMAP_CA_FILE": str(self.ca_file),
        }


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(f"dovecot exited with {proc.returncode}:\n{text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(64).startswith(b"* OK"):
                    return
        except OSError:
            time.sleep(0.02)
    pytest.fail(f"dovecot did not answer on port {port} within {timeout:.0f}s; log: {log}")


@pytest.fixture(name="dovecot")
def dovecot_fixture(tmp_path: Path) -> Iterator[Dovecot]:
    """Start Dovecot with a fresh configuration and mailbox; stop it afterwards."""
    binary = shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)), None
    )
    if binary is None:
        reason = "dovecot is not installed (Debian: apt-get install dovecot-imapd)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    # Dovecot's unprivileged helpers must reach the run directory and the passwd file, and
    # pytest's tmp_path sits under a 0700 folder: use a world-readable temporary folder.
    # The log goes to tmp_path (written by the master, as root), kept for a failing test.
    base = Path(tempfile.mkdtemp(prefix="mailer-dovecot-"))
    log = tmp_path / "dovecot.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        base.chmod(0o755)
        if os.geteuid() == 0:
            # The mail processes may not run as root: store mail as "nobody".
            mail_uid, mail_gid, users = 65534, 65534, ""
        else:  # an ordinary user (doc.dovecot.org: "Rootless installation"); untested in CI
            mail_uid, mail_gid = os.getuid(), os.getgid()
            name = pwd.getpwuid(mail_uid).pw_name
            users = f"default_login_user = {name}\ndefault_internal_user = {name}"
        home = base / "home" / USER
        home.mkdir(parents=True)
        if os.geteuid() == 0:
            os.chown(home, mail_uid, mail_gid)

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.cert_chain_pems[0].write_to_path(str(base / "server.pem"))
        cert.private_key_pem.write_to_path(str(base / "server.key"))
        ca_file = tmp_path / "imap-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        (base / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        (base / "passwd").chmod(0o644)

        imap_port, imaps_port = _free_ports(2)
        conf = base / "dovecot.conf"
        conf.write_text(
            _CONF.format(
                base=base,
                log=log,
                users=users,
                uid=mail_uid,
                gid=mail_gid,
                imap_port=imap_port,
                imaps_port=imaps_port,
            )
        )
        proc = subprocess.Popen(
            [binary, "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        _wait_for(imap_port, proc, log)  # the master opens every listener before it forks
        yield Dovecot("127.0.0.1", imap_port, imaps_port, USER, PASSWORD, ca_file, home / "Maildir", log)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)
