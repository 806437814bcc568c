"""The shipped mails in a real browser (issue 13, item 13): headless Chromium opens the HTML
part of each kind (invitation, reminder, update, cancel) of the shipped campaign at 375 and
1024 px; the title and the facts (when, where) are above the fold on a 375 x 667 phone
screen, and nothing is wider than the screen.

`make mail-screenshots` sets MAILER_MAIL_SCREENSHOTS to tests/screenshots/ to refresh the
pictures the README links; otherwise they go under tmp_path and the tracked files stay as
they are.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import start_chromium

from mailer.compose import Composer
from mailer.config import Event, load
from mailer.contacts import Contact
from mailer.planner import dynamic_step, snapshot
from mailer.templates import Templates
from mailer.vocab import EventStatus

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT_ENV = "MAILER_MAIL_SCREENSHOTS"
PHONE = (375, 667)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    driver = start_chromium(tmp_path_factory.mktemp("chromium-mail"))
    try:
        yield driver
    finally:
        driver.quit()


def html_of(kind: str) -> str:
    """The HTML part mailer composes for Jan (Dutch, with an organisation) for ``kind`` of the
    shipped "Aan de slag" meeting; the update moves it one hour later."""
    campaign = load(ROOT / "schedules.yaml")
    templates = Templates(campaign.templates_dir, campaign.language)
    event = campaign.event("aan-de-slag")
    jan = Contact(
        "jan.peeters@example.org",
        "Peeters, Jan",
        "nl",
        frozenset({"indieners"}),
        fields={"organisation": "Buurtwerking De Kaai"},
    )
    when = datetime(2018, 1, 4, 10, tzinfo=campaign.timezone)
    if kind in ("invitation", "reminder"):
        step = campaign.step(
            "uitnodiging-aan-de-slag" if kind == "invitation" else "herinnering-aan-de-slag-dag"
        )
        raw = Composer(campaign, templates).compose_due(step, event, jan, when=when, sequence=0).data
    else:
        after = (
            Event(**{**event.__dict__, "start": event.start + timedelta(hours=1)})
            if kind == "update"
            else Event(**{**event.__dict__, "status": EventStatus.CANCELLED})
        )
        snaps = {
            ("aan-de-slag", 0): json.dumps(snapshot(event)),
            ("aan-de-slag", 1): json.dumps(snapshot(after)),
        }
        composer = Composer(campaign, templates, {"aan-de-slag": (1, "", "")}, snaps)
        step = dynamic_step(campaign, "aan-de-slag", kind, 1, when)
        raw = composer.compose_due(step, after, jan, when=when, sequence=1).data
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    part = msg.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def viewport(browser: Any, width: int, height: int) -> None:
    """Make the page's viewport exactly ``width`` x ``height`` CSS px."""
    browser.set_window_size(width, height)
    inner = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    if inner != [width, height]:  # the window's frame, if any, is not part of the viewport
        browser.set_window_size(2 * width - inner[0], 2 * height - inner[1])
    assert browser.execute_script("return window.innerWidth") == width


@pytest.mark.parametrize("kind", ["invitation", "reminder", "update", "cancel"])
def test_each_kind_in_chromium_at_375_and_1024_px(browser: Any, tmp_path: Path, kind: str) -> None:
    from selenium.webdriver.common.by import By

    out = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page = tmp_path / f"{kind}.html"
    page.write_text(html_of(kind), encoding="utf-8")
    for width in (PHONE[0], 1024):
        viewport(browser, width, PHONE[1] if width == PHONE[0] else 900)
        browser.get(page.as_uri())
        # Nothing wider than the screen (no sideways scrolling on a phone).
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        if width == PHONE[0]:
            heading = browser.find_element(By.TAG_NAME, "h1")
            facts = heading.find_element(By.XPATH, "following::table[1]")
            bottom = facts.rect["y"] + facts.rect["height"]
            assert heading.text == "Aan de slag INTEGRATIEPACT"
            assert bottom <= PHONE[1], f"the facts end at {bottom} px, below the fold of {PHONE[1]}"
            assert "22 januari 2018" in facts.text and "Arduinkaai 7" in facts.text
        # The whole mail in one picture: the viewport as tall as the page.
        viewport(browser, width, browser.execute_script("return document.documentElement.scrollHeight"))
        shot = out / f"mail-{kind}-{width}.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 5000
