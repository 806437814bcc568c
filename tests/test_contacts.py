"""Tests for mailer.contacts.load_contacts, on real files written under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from email_validator import validate_email

from mailer import config
from mailer.contacts import Contact, ContactList, load_contacts

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def load(tmp_path: Path, *paths: Path) -> ContactList:
    return load_contacts(paths, display_root=tmp_path)


def by_email(result: ContactList) -> dict[str, Contact]:
    return {c.email: c for c in result.contacts}


def messages(result: ContactList) -> list[str]:
    return [str(p) for p in result.problems]


# --- delimiters and encodings ------------------------------------------------------------


@pytest.mark.parametrize(
    "header, row",
    [
        ("email,name,language", "an@example.be,An,nl"),
        ("email;naam;taal", "an@example.be;An;nl"),  # Excel in Belgium
        ("email\tname\tlanguage", "an@example.be\tAn\tnl"),
    ],
    ids=["comma", "semicolon", "tab"],
)
def test_delimiter_is_sniffed_from_the_header(tmp_path: Path, header: str, row: str) -> None:
    result = load(tmp_path, write(tmp_path, "c.csv", f"{header}\n{row}\n"))
    assert result.problems == []
    [c] = result.contacts
    assert (c.email, c.name, c.language) == ("an@example.be", "An", "nl")


def test_utf8_bom_is_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "\ufeffemail;name\r\nzoe@example.be;Zoë Vermeulen\r\n")
    result = load(tmp_path, path)
    assert result.problems == []
    assert result.contacts[0].name == "Zoë Vermeulen"


def test_cp1252_is_decoded_with_a_warning_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "oud.csv", "email;name\nhelene@example.be;Hélène Claes\n", "cp1252")
    result = load(tmp_path, path)
    assert result.contacts[0].name == "Hélène Claes"
    [warning] = result.problems
    assert warning.severity == "warning"
    assert warning.where == "oud.csv"
    assert "Windows-1252" in warning.message and "UTF-8" in warning.message


def test_nul_bytes_give_one_error_and_the_file_is_skipped(tmp_path: Path) -> None:
    bad = tmp_path / "sheet.csv"
    bad.write_bytes(b"PK\x03\x04\x00\x00email\x00\xff\xfe garbage")
    good = write(tmp_path, "good.csv", "email\nan@example.be\n")
    result = load(tmp_path, bad, good)
    [error] = result.errors
    assert error.where == "sheet.csv" and "NUL" in error.message
    assert [c.email for c in result.contacts] == ["an@example.be"]


# --- file-level problems -------------------------------------------------------------------


def test_missing_email_column_lists_the_columns_found(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "naam;taal;organisatie\nAn;nl;vzw X\n")
    result = load(tmp_path, path)
    assert result.contacts == []
    [error] = result.problems
    assert error.severity == "error" and error.where == "c.csv"
    for column in ("'naam'", "'taal'", "'organisatie'", "'email'"):
        assert column in error.message


def test_header_aliases_are_accepted(tmp_path: Path) -> None:
    text = " E-Mail ;Naam;LANGUE;Lists\nan@example.be;An;fr;a\n"
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert result.problems == []
    c = result.contacts[0]
    assert (c.email, c.name, c.language, c.lists, c.fields) == (
        "an@example.be",
        "An",
        "fr",
        frozenset({"a"}),
        {},
    )


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\r\n\r\n", b";;;\n"])
def test_empty_file_is_one_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "leeg.csv"
    path.write_bytes(content)
    result = load(tmp_path, path)
    assert result.contacts == []
    [error] = result.problems
    assert error.severity == "error" and error.where == "leeg.csv" and "empty" in error.message


def test_missing_file_is_one_error_and_others_still_load(tmp_path: Path) -> None:
    good = write(tmp_path, "good.csv", "email\nan@example.be\n")
    result = load(tmp_path, tmp_path / "nope.csv", good)
    [error] = result.problems
    assert error.where == "nope.csv" and "not found" in error.message
    assert len(result.contacts) == 1


def test_source_is_relative_to_display_root_or_as_given(tmp_path: Path) -> None:
    path = write(tmp_path, "partners.csv", "email\nan@example.be\n")
    assert load_contacts([path], display_root=tmp_path).contacts[0].source == "partners.csv:row 2"
    assert load_contacts([path]).contacts[0].source == f"{path}:row 2"


# --- addresses ------------------------------------------------------------------------------


def test_bad_address_is_a_warning_with_file_and_row_and_the_row_is_kept_as_invalid(tmp_path: Path) -> None:
    """Issue 12: a warning (the rest of the list can be sent), and the row is kept as invalid
    (the address as written, trimmed, with its lists) so the ledger can record it."""
    text = "email,name,lists\nan@example.be,An,a\n not-an-address ,Bert,a;b\njan@example,Jan,\nzoe@example.org,Zoë,\n"
    result = load(tmp_path, write(tmp_path, "x.csv", text))
    assert [c.email for c in result.contacts] == ["an@example.be", "zoe@example.org"]
    assert [(p.where, p.severity, p.field) for p in result.problems] == [
        ("x.csv:row 3", "warning", "email"),
        ("x.csv:row 4", "warning", "email"),
    ]
    assert [(i.email, i.name, i.lists) for i in result.invalid] == [
        ("not-an-address", "Bert", frozenset({"a", "b"})),
        ("jan@example", "Jan", frozenset()),
    ]
    assert result.invalid[0].reason.startswith("x.csv:row 3: 'not-an-address' is not a usable email address")
    assert "'not-an-address'" in result.problems[0].message
    assert "@-sign" in result.problems[0].message  # the library's reason is passed on


def test_row_without_address_is_a_warning(tmp_path: Path) -> None:
    result = load(tmp_path, write(tmp_path, "x.csv", "email,name\n,An\n"))
    [warning] = result.warnings
    assert warning.where == "x.csv:row 2" and not result.errors


def test_domain_is_lowercased_and_idn_normalised(tmp_path: Path) -> None:
    text = "email\nJan.Peeters@EXAMPLE.BE\nan@BÜCHER.example.com\nbert@xn--bcher-kva.example.org\n"
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert result.problems == []
    assert [c.email for c in result.contacts] == [
        "Jan.Peeters@example.be",  # local part kept as the library normalises it
        "an@bücher.example.com",
        "bert@bücher.example.org",
    ]


def test_addresses_match_email_validator_normalisation(tmp_path: Path) -> None:
    # _address takes a shortcut for common addresses; it must agree with the library.
    addresses = [
        "a.b+c@Example.ORG",
        "Postmaster@Example.org",
        "INFO@example.be",
        "o'brien@example.com",
        "élève@example.be",
        "x@xn--bcher-kva.example",
        "user@sub.Domain.example.com",
        "Ünïcode@Exämple.org",
    ]
    text = "email\n" + "".join(f"{a}\n" for a in addresses)
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert result.problems == []
    expected = sorted(
        (v := validate_email(a, check_deliverability=False)).local_part + "@" + v.domain.lower()
        for a in addresses
    )
    assert [c.email for c in result.contacts] == expected


# --- duplicates -------------------------------------------------------------------------------


def test_duplicates_are_merged_with_a_warning_naming_both_rows(tmp_path: Path) -> None:
    a = write(tmp_path, "a.csv", "email,name,lists,tags,org\nan@example.be,,indieners,x,\n")
    b = write(
        tmp_path,
        "b.csv",
        "email;name;language;lists;tags;org\nAN@EXAMPLE.BE;x;fr;z;w;v\n"
        "an@Example.be;An De Clercq;nl;lerend-netwerk;y;vzw Samen\n",
    )
    result = load(tmp_path, a, b)
    # The local part's case does not make another person: one contact, one mail.
    assert [c.email for c in result.contacts] == ["an@example.be"]
    c = by_email(result)["an@example.be"]
    assert c.lists == {"indieners", "z", "lerend-netwerk"}
    assert c.tags == {"x", "w", "y"}
    assert (c.name, c.language, c.fields, c.source) == ("x", "fr", {"org": "v"}, "a.csv:row 2")
    assert [w.where for w in result.warnings] == ["b.csv:row 2", "b.csv:row 3"]
    assert all("a.csv:row 2" in w.message for w in result.warnings)


def test_duplicate_in_one_file_keeps_first_values(tmp_path: Path) -> None:
    text = "email,name,lists\nan@example.be,An,a\nbert@example.be,Bert,b\nan@example.be,Anna,c|a\n"
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    c = by_email(result)["an@example.be"]
    assert (c.name, c.lists) == ("An", frozenset({"a", "c"}))
    [warning] = result.problems
    assert warning.where == "c.csv:row 4" and "c.csv:row 2" in warning.message


# --- names, fields, quoting ---------------------------------------------------------------------


def test_name_with_a_line_break_refuses_the_file(tmp_path: Path) -> None:
    """A CSV line break in a name is a row read into it, or a header injection: not repaired."""
    text = 'email,name\nan@example.be,"An\r\nBcc: victim@example.org"\n'
    assert_unusable(load(tmp_path, write(tmp_path, "c.csv", text)), "c.csv:row 2", "name", "one line")


def test_name_with_control_characters_is_cleaned_with_a_warning(tmp_path: Path) -> None:
    text = 'email,name\nan@example.be,"An\x0bBcc: victim@example.org"\nbert@example.be,"Bert\u2028X\x1b"\n'
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    names = {c.email: c.name for c in result.contacts}
    assert names == {"an@example.be": "An Bcc: victim@example.org", "bert@example.be": "Bert X"}
    assert [(p.where, p.severity, p.field) for p in result.problems] == [
        ("c.csv:row 2", "warning", "name"),
        ("c.csv:row 3", "warning", "name"),
    ]


def test_name_with_html_is_kept_verbatim(tmp_path: Path) -> None:
    text = 'email,name\nan@example.be,"<b>An</b> & <script>alert(1)</script>"\n'
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert result.problems == []
    assert result.contacts[0].name == "<b>An</b> & <script>alert(1)</script>"


def test_comma_inside_quoted_name(tmp_path: Path) -> None:
    result = load(tmp_path, write(tmp_path, "c.csv", 'email,name\njan@example.org,"Peeters, Jan"\n'))
    assert result.problems == []
    assert result.contacts[0].name == "Peeters, Jan"


def test_multiline_cell_keeps_physical_row_numbers(tmp_path: Path) -> None:
    text = (
        "email,name,adres\n"
        'an@example.be,An,"Arduinkaai 7\n1000 Brussel"\n'
        "\n"
        "bad-address,Bert,x\n"
        "zoe@example.org,Zoë,y\n"
    )
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    c = by_email(result)
    assert c["an@example.be"].source == "c.csv:row 2"
    assert c["an@example.be"].fields == {"adres": "Arduinkaai 7 1000 Brussel"}
    assert [p.where for p in result.problems] == ["c.csv:row 5"]
    assert c["zoe@example.org"].source == "c.csv:row 6"


def test_extra_columns_become_fields_with_normalised_keys(tmp_path: Path) -> None:
    text = "email;Organisation;Postal Code;first-name;Prijs (€)\nan@example.be;vzw X;1000;An;5\n"
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert result.contacts[0].fields == {
        "organisation": "vzw X",
        "postal_code": "1000",
        "first_name": "An",
        "prijs_(€)": "5",
    }
    [warning] = result.problems  # "prijs_(€)" is kept but is not a usable variable name
    assert warning.severity == "warning" and "prijs_(€)" in warning.message


def test_control_characters_are_stripped_from_fields(tmp_path: Path) -> None:
    text = 'email,org\nan@example.be,"vzw\x1b X\x07\tY\r\nZ\x7f"\n'
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert result.contacts[0].fields == {"org": "vzw X\tY Z"}


def test_lists_and_tags_are_split_trimmed_and_lowercased(tmp_path: Path) -> None:
    text = 'email,lists,tags\nan@example.be,"Indieners; Lerend-Netwerk,,|x",VIP | Gent\n'
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    c = result.contacts[0]
    assert c.lists == {"indieners", "lerend-netwerk", "x"} and c.tags == {"vip", "gent"}


def test_rows_with_too_many_or_too_few_cells(tmp_path: Path) -> None:
    text = "email,name,org\nan@example.be,An,X,extra\nbert@example.be\ncees@example.be,C,Z,\n"
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    c = by_email(result)
    assert c["an@example.be"].fields == {"org": "X"}
    assert (c["bert@example.be"].name, c["bert@example.be"].fields) == ("", {"org": ""})
    # Only the row whose extra cell holds something is reported; an empty trailing cell is not.
    assert [(p.where, p.severity) for p in result.problems] == [("c.csv:row 2", "warning")]


@pytest.mark.parametrize(
    "raw, expected",
    [("nl", "nl"), ("NL", "nl"), ("nl-BE", "nl_BE"), ("nl_be", "nl_BE"), (" fr ", "fr"), ("", None)],
)
def test_language_is_normalised(tmp_path: Path, raw: str, expected: str | None) -> None:
    result = load(tmp_path, write(tmp_path, "c.csv", f"email;taal\nan@example.be;{raw}\n"))
    assert result.problems == []
    assert result.contacts[0].language == expected


def test_invalid_language_is_a_warning_and_none(tmp_path: Path) -> None:
    result = load(tmp_path, write(tmp_path, "c.csv", "email;taal\nan@example.be;Nederlands\n"))
    assert result.contacts[0].language is None
    [warning] = result.problems
    assert (warning.where, warning.severity, warning.field) == ("c.csv:row 2", "warning", "language")


# --- scale and the shipped campaign -------------------------------------------------------------


def test_twenty_thousand_rows_load(tmp_path: Path) -> None:
    """All rows load, sorted by email (the time it takes is measured by bench/micro.py)."""
    rows = "".join(
        f"user.{i}@example{i % 97}.be;Naam {i};nl-BE;indieners;a|b;Org {i}\n" for i in range(20_000)
    )
    path = write(tmp_path, "big.csv", "email;name;language;lists;tags;organisation\n" + rows)
    result = load(tmp_path, path)
    assert result.problems == []
    assert len(result.contacts) == 20_000
    assert result.contacts[0].email == "user.0@example0.be"  # sorted by email


def test_shipped_contacts_load_without_problems() -> None:
    campaign = config.load(ROOT / "schedules.yaml")
    paths = campaign.contact_paths()
    assert {p.name for p in paths} == {"indieners.csv", "lerend-netwerk.csv"}
    result = load_contacts(paths, display_root=campaign.base_dir)
    assert result.problems == []
    lists = set().union(*(c.lists for c in result.contacts))
    assert {"indieners", "lerend-netwerk"} <= lists
    for step in campaign.steps:  # every step reaches somebody
        assert any(step.audience.matches(c.lists, c.tags) for c in result.contacts), step.id
    assert all(c.fields.get("organisation") for c in result.contacts)
    assert {c.language for c in result.contacts} == {"nl", "fr", "en"}
    assert all(c.source.startswith("contacts/") for c in result.contacts)


# --- other spreadsheet habits -------------------------------------------------------------------


def test_excel_unicode_text_export_is_read(tmp_path: Path) -> None:
    # Excel's "Unicode text" is UTF-16 with a BOM and tab-separated.
    path = tmp_path / "unicode.txt"
    path.write_bytes("email\tname\r\nfrancois@example.be\tFrançois Lefèvre\r\n".encode("utf-16"))
    result = load(tmp_path, path)
    assert result.problems == []
    assert result.contacts[0].name == "François Lefèvre"


def test_data_without_header_row_gets_a_hint(tmp_path: Path) -> None:
    result = load(tmp_path, write(tmp_path, "c.csv", "an@example.be;An\nbert@example.be;Bert\n"))
    [error] = result.errors
    assert "'an@example.be'" in error.message and "header row" in error.message


def test_header_only_is_a_warning(tmp_path: Path) -> None:
    result = load(tmp_path, write(tmp_path, "c.csv", "email;name\n"))
    assert result.contacts == []
    [warning] = result.problems
    assert warning.severity == "warning" and "no contacts" in warning.message


def test_same_file_twice_is_read_once(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "email\nan@example.be\n")
    result = load(tmp_path, path, tmp_path / "." / "c.csv")
    assert result.problems == [] and len(result.contacts) == 1


# --- a file that cannot be read safely is unusable (issue 12) -------------------------------
# One unbalanced quote used to make the reader swallow every later row into one cell: u2's
# invitation carried the addresses, names and organisations of the others (a data leak).

TEN = "email,name,organisation\n" + "".join(
    f"u{i}@example.org,User{i},Org{i}\n" if i != 2 else 'u2@example.org,"Unclosed,a,Org2\n'
    for i in range(1, 11)
)


def assert_unusable(result: ContactList, where: str, field: str, *words: str) -> None:
    """One blocking error naming file:row and the column, and no contact read from the file."""
    [error] = result.errors
    assert (error.where, error.field) == (where, field), error
    for w in words:
        assert w in error.message, error.message
    assert result.contacts == [] and result.invalid == []


def test_an_unbalanced_quote_makes_the_file_unusable(tmp_path: Path) -> None:
    result = load(tmp_path, write(tmp_path, "c.csv", TEN))
    assert_unusable(result, "c.csv:row 3", "name", "quote", "lines 3-11")


def test_an_unbalanced_quote_in_a_free_column_is_caught_by_the_addresses_it_swallowed(tmp_path: Path) -> None:
    text = 'email,organisation,name\nu1@example.org,"Org1,User1\nu2@example.org,Org2,User2\n'
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert_unusable(result, "c.csv:row 2", "organisation", "email address", "quote")


@pytest.mark.parametrize("column", ["email", "name", "language", "lists", "tags"])
def test_a_line_break_in_a_one_line_column_makes_the_file_unusable(tmp_path: Path, column: str) -> None:
    cells = {"email": "an@example.be", "name": "An", "language": "nl", "lists": "a", "tags": "b"}
    cells[column] = cells[column][:1] + "\r\n" + cells[column][1:]
    header = ",".join(cells)
    row = ",".join(f'"{v}"' for v in cells.values())
    result = load(tmp_path, write(tmp_path, "c.csv", f"{header}\nok@example.be,Ok,nl,a,b\n{row}\n"))
    assert_unusable(result, "c.csv:row 3", column, "lines 3-4")


def test_a_cell_over_many_lines_makes_the_file_unusable(tmp_path: Path) -> None:
    notes = "\n".join(f"line {i}" for i in range(12))
    text = f'email,notes\nan@example.be,"{notes}"\nbert@example.be,x\n'
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert_unusable(result, "c.csv:row 2", "notes", "12 lines")


@pytest.mark.parametrize(
    "column, size, limit", [("name", 1001, "1,000"), ("tags", 5000, "1,000"), ("bio", 10_001, "10,000")]
)
def test_an_overlong_cell_makes_the_file_unusable(tmp_path: Path, column: str, size: int, limit: str) -> None:
    text = f"email,{column}\nan@example.be,x\nbert@example.be,{'y' * size}\n"
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert_unusable(result, "c.csv:row 3", column, f"{size:,} characters", limit)


def test_a_cell_over_the_csv_field_limit_makes_the_file_unusable(tmp_path: Path) -> None:
    """Today a 128 KiB cell stopped the reader: the rows after it were silently dropped."""
    text = f'email,name\nan@example.be,An\nbert@example.be,"{"y" * 200_000}"\nzoe@example.be,Zoe\n'
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert_unusable(result, "c.csv:row 3", "", "131,072")


def test_an_unusable_file_leaves_the_other_files_alone(tmp_path: Path) -> None:
    good = write(tmp_path, "good.csv", "email,name\nu1@example.org,First\n")
    result = load(tmp_path, good, write(tmp_path, "bad.csv", TEN))
    assert [p.where for p in result.errors] == ["bad.csv:row 3"]
    assert [(c.email, c.name) for c in result.contacts] == [("u1@example.org", "First")]


def test_a_postal_address_over_a_few_lines_is_still_fine(tmp_path: Path) -> None:
    text = 'email,adres\nan@example.be,"Arduinkaai 7\nbus 3\n1000 Brussel\nBelgium"\n'
    result = load(tmp_path, write(tmp_path, "c.csv", text))
    assert result.problems == []
    assert result.contacts[0].fields == {"adres": "Arduinkaai 7 bus 3 1000 Brussel Belgium"}
