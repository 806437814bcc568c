"""What `mailer status` needs of a campaign (its id, time zone and step times), remembered
between runs so that a status in a campaign folder does not validate schedules.yaml again.

Validating the campaign means importing pydantic and email-validator (~0.2 s, more than the
rest of `mailer status` on a million-row ledger: issue 16). The view is the result of a full
:func:`mailer.config.load`, stored as JSON in the user's cache folder under the file's path,
and used only while schedules.yaml has the same bytes and mailer's validating code (config,
schema, times) the same size and time stamp; anything else loads and validates again. An
unreadable or unwritable cache is the same as none.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from . import __version__

if TYPE_CHECKING:
    from .config import Campaign

__all__ = ["CACHE_ENV", "CampaignTimes", "StepTime", "cache_dir", "lookup", "remember"]

#: The folder for the cache (default ``$XDG_CACHE_HOME/mailer``, else ``~/.cache/mailer``).
CACHE_ENV = "MAILER_CACHE_DIR"
#: The modules whose code decides whether a campaign is valid and when its steps are.
_CODE = ("config.py", "schema.py", "times.py", "yamlsource.py", "statusview.py")


@dataclass(frozen=True)
class StepTime:
    """A step as status shows it: ``at`` (aware) and whether it goes at each recipient's hour."""

    id: str
    at: datetime
    local: bool


@dataclass(frozen=True)
class CampaignTimes:
    """The parts of a valid :class:`~mailer.config.Campaign` that `mailer status` shows, and
    its ledger (so that status need not parse the YAML for ``ledger:`` either)."""

    id: str
    timezone: ZoneInfo
    steps: tuple[StepTime, ...]
    ledger: Path

    @classmethod
    def of(cls, campaign: Campaign) -> CampaignTimes:
        steps = tuple(StepTime(s.id, s.at, s.local) for s in campaign.steps)
        return cls(campaign.id, campaign.timezone, steps, campaign.ledger)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ledger": str(self.ledger),
            "timezone": self.timezone.key,
            "steps": [[s.id, s.at.isoformat(), s.local] for s in self.steps],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CampaignTimes:
        """:raises (KeyError, TypeError, ValueError): not what :meth:`to_json` wrote."""
        steps = tuple(
            StepTime(str(i), datetime.fromisoformat(at), bool(local)) for i, at, local in data["steps"]
        )
        if any(s.at.tzinfo is None for s in steps):
            raise ValueError("naive step time")
        return cls(str(data["id"]), ZoneInfo(data["timezone"]), steps, Path(data["ledger"]))


def cache_dir(env: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV])
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mailer"


def _key(config_path: Path, data: bytes) -> tuple[Path, str]:
    """The cache file for this campaign file, and the fingerprint its entry must carry."""
    where = str(config_path.absolute())
    code = Path(__file__).parent
    stamps = []
    for name in _CODE:
        st = (code / name).stat()
        stamps.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    fingerprint = hashlib.sha256("\n".join([__version__, where, *stamps]).encode() + b"\n" + data).hexdigest()
    name = hashlib.sha256(where.encode()).hexdigest()[:24] + ".json"
    return cache_dir() / name, fingerprint


def lookup(config_path: Path, data: bytes) -> CampaignTimes | None:
    """The view remembered for ``config_path`` whose content is ``data``; None if there is none
    for these bytes (or this mailer's code)."""
    try:
        file, fingerprint = _key(config_path, data)
        entry = json.loads(file.read_text("utf-8"))
        if entry.get("fingerprint") != fingerprint:
            return None
        return CampaignTimes.from_json(entry["view"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(config_path: Path, data: bytes, view: CampaignTimes) -> None:
    """Store ``view`` (of the valid campaign ``data`` describes) for the next :func:`lookup`."""
    try:
        file, fingerprint = _key(config_path, data)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "view": view.to_json()}), "utf-8")
        os.replace(tmp, file)  # whole or not at all, for a status running at the same time
    except OSError:
        pass
