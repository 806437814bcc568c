"""The words of `mailer web`'s own pages in each language it speaks (nl, fr, en)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .config import language_chain

__all__ = ["LANGUAGES", "TEXTS", "page_language", "texts"]

#: The languages of the pages; another reader gets the campaign's language, else English.
LANGUAGES: Final = ("nl", "fr", "en")

TEXTS: Final[Mapping[str, Mapping[str, str]]] = {
    "en": {
        "rsvp_title": "Your answer",
        "choose": "Will you attend?",
        "confirm_accepted": "Yes, I will attend",
        "confirm_tentative": "Maybe",
        "confirm_declined": "No, I cannot attend",
        "word_accepted": "attending",
        "word_tentative": "maybe",
        "word_declined": "not attending",
        "so_far": "Your answer so far:",
        "outdated": "You answered before the event changed; please answer again.",
        "recorded": "Thank you. Your answer is recorded:",
        "change": "Change your answer:",
        "when": "When",
        "where": "Where",
        "cancelled": "This event has been cancelled. There is nothing to answer.",
        "unsubscribe_title": "Unsubscribe",
        "unsubscribe_ask": "Stop receiving mails from {name} at {address}?",
        "unsubscribe_button": "Unsubscribe",
        "unsubscribed": "Done: {address} will receive no more mails from {name}.",
        "not_found_title": "Page not found",
        "not_found": "This link is not valid. Check that it was copied completely from the mail.",
        "error_title": "Something went wrong",
        "error": "Something went wrong on our side. Please try again later.",
        "busy": "We could not save your answer just now. Please try again in a minute.",
        "too_many": "Too many requests from your address. Please wait a minute and try again.",
        "too_large": "The request is too large.",
        "bad_request": "This form was not sent as expected. Please use the button on the page.",
    },
    "nl": {
        "rsvp_title": "Uw antwoord",
        "choose": "Komt u?",
        "confirm_accepted": "Ja, ik kom",
        "confirm_tentative": "Misschien",
        "confirm_declined": "Nee, ik kan niet komen",
        "word_accepted": "ik kom",
        "word_tentative": "misschien",
        "word_declined": "ik kom niet",
        "so_far": "Uw antwoord tot nu toe:",
        "outdated": "U antwoordde voor het evenement veranderde; antwoord opnieuw.",
        "recorded": "Dank u. Uw antwoord is genoteerd:",
        "change": "Uw antwoord wijzigen:",
        "when": "Wanneer",
        "where": "Waar",
        "cancelled": "Dit evenement is geannuleerd. Er is niets te beantwoorden.",
        "unsubscribe_title": "Uitschrijven",
        "unsubscribe_ask": "Geen mails meer van {name} op {address}?",
        "unsubscribe_button": "Uitschrijven",
        "unsubscribed": "Gedaan: {address} krijgt geen mails meer van {name}.",
        "not_found_title": "Pagina niet gevonden",
        "not_found": "Deze link is niet geldig. Controleer of hij volledig uit de mail is gekopieerd.",
        "error_title": "Er ging iets mis",
        "error": "Er ging iets mis bij ons. Probeer het later opnieuw.",
        "busy": "Uw antwoord kon nu niet worden bewaard. Probeer het over een minuut opnieuw.",
        "too_many": "Te veel verzoeken van uw adres. Wacht een minuut en probeer het opnieuw.",
        "too_large": "Het verzoek is te groot.",
        "bad_request": "Dit formulier kwam niet aan zoals verwacht. Gebruik de knop op de pagina.",
    },
    "fr": {
        "rsvp_title": "Votre réponse",
        "choose": "Serez-vous présent(e) ?",
        "confirm_accepted": "Oui, je serai présent(e)",
        "confirm_tentative": "Peut-être",
        "confirm_declined": "Non, je ne pourrai pas venir",
        "word_accepted": "présent(e)",
        "word_tentative": "peut-être",
        "word_declined": "absent(e)",
        "so_far": "Votre réponse jusqu'ici :",
        "outdated": "Vous avez répondu avant que l'événement ne change ; veuillez répondre à nouveau.",
        "recorded": "Merci. Votre réponse est enregistrée :",
        "change": "Modifier votre réponse :",
        "when": "Quand",
        "where": "Où",
        "cancelled": "Cet événement a été annulé. Il n'y a rien à répondre.",
        "unsubscribe_title": "Se désabonner",
        "unsubscribe_ask": "Ne plus recevoir de mails de {name} à l'adresse {address} ?",
        "unsubscribe_button": "Me désabonner",
        "unsubscribed": "C'est fait : {address} ne recevra plus de mails de {name}.",
        "not_found_title": "Page introuvable",
        "not_found": "Ce lien n'est pas valable. Vérifiez qu'il a été copié entièrement depuis le mail.",
        "error_title": "Une erreur s'est produite",
        "error": "Une erreur s'est produite de notre côté. Veuillez réessayer plus tard.",
        "busy": "Votre réponse n'a pas pu être enregistrée pour l'instant. Réessayez dans une minute.",
        "too_many": "Trop de demandes depuis votre adresse. Patientez une minute et réessayez.",
        "too_large": "La demande est trop volumineuse.",
        "bad_request": "Ce formulaire n'a pas été envoyé comme prévu. Utilisez le bouton de la page.",
    },
}


def page_language(language: str | None, campaign_language: str) -> str:
    """The page language for a reader of ``language``: theirs, else the campaign's, else English.

    >>> page_language("nl_BE", "fr"), page_language("de", "fr"), page_language(None, "de")
    ('nl', 'fr', 'en')
    """
    for lang in language_chain(language, campaign_language):
        base = lang.partition("_")[0].lower()
        if base in LANGUAGES:
            return base
    return "en"


def texts(language: str) -> Mapping[str, str]:
    """The words of the pages in ``language`` (one of :data:`LANGUAGES`, else English)."""
    return TEXTS.get(language, TEXTS["en"])
