"""Templates: language fallback, Babel filters, escaping, error reports and the shipped mails.

Real files throughout: the shipped templates and schedules.yaml, and small template trees
written to tmp_path.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailer.config import Campaign, load
from mailer.contacts import Contact
from mailer.errors import TemplateError
from mailer.templates import Rendered, Templates, context, locale_for
from mailer.vocab import EventStatus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def campaign() -> Campaign:
    return load(ROOT / "schedules.yaml")


@pytest.fixture(scope="module")
def shipped(campaign: Campaign) -> Templates:
    return Templates(campaign.templates_dir, campaign.language)


JAN = Contact(
    "jan@example.be",
    "Jan Peeters",
    "nl",
    frozenset({"indieners"}),
    fields={"organisation": "vzw Samen Sterk"},
)
ANON = Contact("info@example.be", "", None, frozenset({"lerend-netwerk"}))


def ctx(campaign: Campaign, step_id: str, contact: Contact = JAN) -> dict[str, Any]:
    step = campaign.step(step_id)
    return context(campaign, campaign.event(step.event), step, contact)


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


def tree(name: str, lang: str, subject: str = "S", text: str = "T", html: str = "H") -> dict[str, str]:
    return {
        f"{name}/{lang}/subject.txt": subject,
        f"{name}/{lang}/body.txt": text,
        f"{name}/{lang}/body.html": html,
    }


DATES = "{{ event.start | date }}|{{ event.start | time }}|{{ event.start | datetime }}"


# -- locales and filters -----------------------------------------------------------------


def test_locale_for_maps_bare_languages_to_the_campaign_region() -> None:
    assert str(locale_for("nl")) == "nl_BE"
    assert str(locale_for("fr")) == "fr_BE"
    assert str(locale_for("de")) == "de_BE"
    assert str(locale_for("en")) == "en_GB"
    assert str(locale_for("pt_BR")) == "pt_BR"
    assert str(locale_for("nl-nl")) == "nl_NL"
    with pytest.raises(ValueError, match="unknown language"):
        locale_for("xx")


def test_dutch_date_time_and_datetime(tmp_path: Path, campaign: Campaign) -> None:
    short = "|{{ event.start | date('short') }}"
    t = Templates(write(tmp_path, tree("x", "nl", text=DATES + short)), "nl")
    r = t.render("x", "nl", ctx(campaign, "uitnodiging-aan-de-slag"))
    assert r.text == "maandag 22 januari 2018|09:30|maandag 22 januari 2018 om 09:30|22/01/2018"
    assert r.language == "nl"


def test_french_locale(tmp_path: Path, campaign: Campaign) -> None:
    t = Templates(write(tmp_path, {**tree("x", "nl", text=DATES), **tree("x", "fr", text=DATES)}), "nl")
    r = t.render("x", "fr", ctx(campaign, "uitnodiging-aan-de-slag"))
    assert r.language == "fr"
    assert r.text.startswith("lundi 22 janvier 2018|09:30|lundi 22 janvier 2018")
    assert r.text.endswith("à 09:30")  # the French word comes from Babel, not from us


def test_times_are_formatted_in_the_campaign_time_zone(tmp_path: Path, campaign: Campaign) -> None:
    # Summer time: 2018-07-02 09:30 Brussels is 07:30 UTC; the mail must say 09:30.
    ev = campaign.event("aan-de-slag")
    summer = replace(ev, start=ev.start.replace(month=7, day=2), end=ev.end.replace(month=7, day=2))
    t = Templates(write(tmp_path, tree("x", "nl", text=DATES)), "nl")
    c = context(campaign, summer, campaign.step("uitnodiging-aan-de-slag"), JAN)
    assert t.render("x", "nl", c).text == "maandag 2 juli 2018|09:30|maandag 2 juli 2018 om 09:30"


# -- language fallback -------------------------------------------------------------------


def test_fallback_to_the_campaign_language_when_there_is_no_german(
    shipped: Templates, campaign: Campaign
) -> None:
    de = replace(JAN, language="de")
    c = ctx(campaign, "uitnodiging-aan-de-slag", de)
    r = shipped.render("uitnodiging-aan-de-slag", "de", c)
    assert r.language == "nl"
    assert "maandag 22 januari" in r.text  # Dutch mail, Dutch dates
    assert "de" not in shipped.languages("uitnodiging-aan-de-slag")


def test_exact_then_base_then_default(tmp_path: Path, campaign: Campaign) -> None:
    t = Templates(
        write(
            tmp_path,
            {**tree("x", "nl", text="nl"), **tree("x", "nl_BE", text="be"), **tree("x", "en", text="en")},
        ),
        "en",
    )
    c = ctx(campaign, "uitnodiging-aan-de-slag")
    assert t.languages("x") == ["en", "nl", "nl_BE"]
    assert (t.render("x", "nl_BE", c).text, t.render("x", "nl_BE", c).language) == ("be", "nl_BE")
    assert t.render("x", "nl-be", c).language == "nl_BE"
    assert t.render("x", "nl_NL", c).language == "nl"
    assert t.render("x", "nl", c).language == "nl"
    assert t.render("x", "fr", c).language == "en"
    assert t.render("x", None, c).language == "en"


def test_shipped_nl_be_falls_back_to_nl(shipped: Templates, campaign: Campaign) -> None:
    r = shipped.render("herinnering", "nl_BE", ctx(campaign, "herinnering-aan-de-slag-dag"))
    assert r.language == "nl"


# -- escaping and the subject line -------------------------------------------------------


def test_html_is_escaped_and_text_is_verbatim(shipped: Templates, campaign: Campaign) -> None:
    evil = Contact(
        "x@example.be",
        "<script>alert(1)</script>",
        "nl",
        frozenset({"indieners"}),
        fields={"organisation": "Tom & Jerry"},
    )
    r = shipped.render("uitnodiging-aan-de-slag", "nl", ctx(campaign, "uitnodiging-aan-de-slag", evil))
    assert "<script>" not in r.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.html
    assert "Tom &amp; Jerry" in r.html and "Tom & Jerry" not in r.html
    assert "Beste <script>alert(1)</script>," in r.text
    assert "Tom & Jerry" in r.text


def test_subject_from_data_is_one_line(tmp_path: Path, campaign: Campaign) -> None:
    t = Templates(write(tmp_path, tree("x", "nl", subject="Hallo {{ contact.name }}\n\n")), "nl")
    sneaky = replace(JAN, name="Jan\r\nBcc: evil@example.com\t X")
    r = t.render("x", "nl", ctx(campaign, "uitnodiging-aan-de-slag", sneaky))
    assert r.subject == "Hallo Jan Bcc: evil@example.com X"


# -- errors ------------------------------------------------------------------------------


def test_undefined_variable_names_file_line_and_what_exists(tmp_path: Path, campaign: Campaign) -> None:
    files = tree("x", "nl", text="a\nb\nHallo {{ contact.nickname }}\n")
    t = Templates(write(tmp_path, files), "nl")
    with pytest.raises(TemplateError) as info:
        t.render("x", "nl", ctx(campaign, "uitnodiging-aan-de-slag"))
    (p,) = info.value.problems
    assert p.where.endswith("x/nl/body.txt:3")
    assert "contact.nickname" in p.message
    assert "available: contact, event, campaign, step" in p.message
    assert "organisation" in p.message  # the keys contact does have
    assert "Traceback" not in str(info.value)


def test_undefined_variable_in_the_layout(tmp_path: Path, campaign: Campaign) -> None:
    files = tree("x", "nl", html='{% extends "_layout.html" %}{% block c %}x{% endblock %}')
    t = Templates(
        write(tmp_path, {**files, "_layout.html": "<p>\n{% block c %}{% endblock %}\n{{ footer }}</p>"}), "nl"
    )
    assert t.check(["x"]) == []  # an undefined name is a render-time problem
    with pytest.raises(TemplateError) as info:
        t.render("x", "nl", ctx(campaign, "uitnodiging-aan-de-slag"))
    (p,) = info.value.problems
    assert p.where.endswith("_layout.html:3")
    assert "undefined variable footer" in p.message


def test_check_reports_syntax_errors_with_file_and_line(tmp_path: Path) -> None:
    t = Templates(write(tmp_path, tree("x", "nl", html="<p>\n{% if %}</p>\n")), "nl")
    (p,) = t.check(["x"])
    assert p.where.endswith("x/nl/body.html:2")
    assert "syntax error" in p.message


def test_check_reports_every_problem_at_once(tmp_path: Path) -> None:
    files = {
        **tree("good", "nl"),
        **tree("broken", "nl", text="one\ntwo\nthree\n{{ contact.name }\n"),
        **tree("english-only", "en"),
        "incomplete/nl/subject.txt": "S",
        "incomplete/nl/body.txt": "T",
        **tree("layout", "nl", html='{% extends "_layout.html" %}'),
        "_layout.html": "{% block content %}\n{% endblok %}",
    }
    t = Templates(write(tmp_path, files), "nl")
    names = ["good", "missing", "broken", "english-only", "incomplete", "layout", "broken"]
    problems = {p.where.replace(str(tmp_path) + "/", ""): p.message for p in t.check(names)}
    assert set(problems) == {
        "missing",
        "broken/nl/body.txt:4",
        "english-only/nl",
        "incomplete/nl/body.html",
        "_layout.html:2",
    }
    assert "not found" in problems["missing"]
    assert "campaign language" in problems["english-only/nl"]
    assert "file missing" in problems["incomplete/nl/body.html"]


def test_check_without_templates_folder(tmp_path: Path) -> None:
    (p,) = Templates(tmp_path / "nope", "nl").check(["x"])
    assert "templates folder not found" in p.message


def test_render_unknown_template(shipped: Templates, campaign: Campaign) -> None:
    with pytest.raises(TemplateError, match="no-such-template"):
        shipped.render("no-such-template", "nl", ctx(campaign, "uitnodiging-aan-de-slag"))


def test_templates_are_compiled_once(tmp_path: Path, campaign: Campaign) -> None:
    t = Templates(write(tmp_path, tree("x", "nl", text="first")), "nl")
    c = ctx(campaign, "uitnodiging-aan-de-slag")
    assert t.render("x", "nl", c).text == "first"
    (tmp_path / "x/nl/body.txt").write_text("second", encoding="utf-8")
    assert t.render("x", "nl", c).text == "first"


# -- the shipped campaign ----------------------------------------------------------------


def test_shipped_templates_check_clean(shipped: Templates, campaign: Campaign) -> None:
    assert shipped.check(s.template for s in campaign.steps) == []


STEPS = [s.id for s in load(ROOT / "schedules.yaml").steps]


@pytest.mark.parametrize("step_id", STEPS)
@pytest.mark.parametrize("contact", [JAN, ANON], ids=["with-organisation", "without"])
def test_every_shipped_mail_renders(
    shipped: Templates, campaign: Campaign, step_id: str, contact: Contact
) -> None:
    r = shipped.render(campaign.step(step_id).template, contact.language, ctx(campaign, step_id, contact))
    assert isinstance(r, Rendered) and r.language == "nl"
    assert r.subject and "\n" not in r.subject and len(r.subject) < 130
    for body in (r.text, r.html):
        assert "{{" not in body and "{%" not in body
        if contact is JAN:
            assert "Beste Jan Peeters," in body.replace("<bdi>", "").replace("</bdi>", "")
            assert "vzw Samen Sterk" in body
        else:
            assert "Beste," in body and "Beste ," not in body
    assert r.html.lstrip().startswith("<!DOCTYPE html>") and 'lang="nl"' in r.html
    assert "http" not in r.html  # no external resources in a mail-safe layout


@pytest.mark.parametrize("step_id", [s for s in STEPS if "infosessie" in s])
def test_info_session_invents_no_hour_or_place(shipped: Templates, campaign: Campaign, step_id: str) -> None:
    r = shipped.render(campaign.step(step_id).template, "nl", ctx(campaign, step_id))
    assert r.subject.startswith(campaign.event("infosessie").title) and "dinsdag 16 januari" in r.subject
    for part in (r.subject, r.text, r.html):
        assert "09:" not in part and "u30" not in part and "00:00" not in part
    for part in (r.text, r.html):
        assert "nog niet bekend" in part
        assert "dinsdag 16 januari 2018" in part


def test_info_session_invitation(shipped: Templates, campaign: Campaign) -> None:
    r = shipped.render("uitnodiging-infosessie", "nl", ctx(campaign, "uitnodiging-infosessie"))
    for part in (r.text, r.html):
        assert "Departement Werk en Sociale Economie – Afdeling ESF" in part
        assert "projectoproep 426" in part
        assert "Uur en plaats zijn nog niet bekend" in part
        assert "hele dag" in part  # why the calendar entry is all-day


def test_aan_de_slag_invitation(shipped: Templates, campaign: Campaign) -> None:
    r = shipped.render("uitnodiging-aan-de-slag", "nl", ctx(campaign, "uitnodiging-aan-de-slag"))
    assert r.subject == "Aan de slag INTEGRATIEPACT – uitnodiging voor maandag 22 januari"
    facts = [
        "maandag 22 januari 2018",
        "09:30",
        "16:30",
        "Arduinkaai 7",
        "zaal Top",
        "KVS (Koninklijke Vlaamse Schouwburg)",
        "1.000.000,00 euro",
        "100.000,00",
        "250.000,00",
        "25%",
        "partnerschap",
        "lerend netwerk",
        "Mechelen",
        "Sint-Niklaas",
        "najaar van 2017",
        "administratief-technische infosessie",  # no typed date: it is another event's
    ]
    for part in (r.text, r.html):  # text and HTML say the same things
        for fact in facts:
            assert fact in part, fact


def test_reminder_for_a_timed_event(shipped: Templates, campaign: Campaign) -> None:
    r = shipped.render("herinnering", "nl", ctx(campaign, "herinnering-aan-de-slag-dag"))
    assert r.subject == "Aan de slag INTEGRATIEPACT – herinnering: maandag 22 januari"
    for part in (r.text, r.html):
        assert "maandag 22 januari 2018, van 09:30 tot 16:30" in part
        assert "Arduinkaai 7" in part
        assert "over 3 dagen" in part  # sent on the Friday before
        assert "nog niet bekend" not in part


def test_reminder_the_day_before_says_tomorrow(shipped: Templates, campaign: Campaign) -> None:
    r = shipped.render("herinnering", "nl", ctx(campaign, "herinnering-infosessie-dag"))
    assert "morgen" in r.text and "morgen" in r.html


def test_reminder_for_multi_day_and_cancelled_events(shipped: Templates, campaign: Campaign) -> None:
    ev = campaign.event("infosessie")
    two_days = replace(ev, end=ev.end + timedelta(days=1))
    step = campaign.step("herinnering-infosessie-week")
    r = shipped.render("herinnering", "nl", context(campaign, two_days, step, JAN))
    assert "van dinsdag 16 januari 2018 tot en met woensdag 17 januari 2018" in r.text
    cancelled = replace(campaign.event("aan-de-slag"), status=EventStatus.CANCELLED)
    r = shipped.render("herinnering", "nl", context(campaign, cancelled, step, JAN))
    assert r.subject.startswith("Aan de slag INTEGRATIEPACT – gaat niet door")
    assert "gaat niet door" in r.text and "gaat niet door" in r.html


def test_context_variables(campaign: Campaign) -> None:
    c = ctx(
        campaign,
        "uitnodiging-aan-de-slag",
        replace(JAN, lists=frozenset({"b", "a"}), tags=frozenset({"y", "x"})),
    )
    assert c["contact"]["organisation"] == "vzw Samen Sterk"
    assert c["contact"]["lists"] == ["a", "b"] and c["contact"]["tags"] == ["x", "y"]
    assert c["event"]["location"].startswith("KVS")
    assert c["event"]["start"].tzinfo is campaign.timezone
    assert c["campaign"]["timezone"] == "Europe/Brussels"
    assert c["campaign"]["unsubscribe_mailto"] == "afmelden@example.be"
    assert c["step"]["kind"] == "invitation" and c["step"]["attach_ics"] is True
