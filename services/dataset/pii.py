"""PII and secret detection for dataset rows, pure, one row at a time.

    find_pii(text) -> [Finding(type, start, end), ...]   non-overlapping, sorted by start
    redact(text)   -> (text with "[EMAIL]", "[PHONE]", ... in place of each finding,
                       Counter by type)

Precision comes first: a scrubber that redacts dates, prices and version numbers ruins a training
set, so every type is a shape plus a check that ordinary text rarely passes.

    email        local@domain.tld; the TLD is a two-letter country code or a common generic one
                 (so `q@k.transpose(` and `x@self.weight` in code are not addresses); not the
                 user part of a URL (`https://user:pw@host`) nor an SSH remote (`git@host:path`).
    phone        E.164 (`+44 20 7946 0958`: an assigned country code, 8-15 digits) and North
                 American numbers (`(555) 123-4567`, `555-123-4567`, `555.123.4567`,
                 `1-800-555-0199`; area code 2-9xx, consistent separators, not the tail of a
                 longer digit group; the exchange is not checked, as sample numbers like
                 555-123-4567 are common). National formats without a country code
                 (`020 7946 0958`) are not detected: they look like any digit group.
    credit_card  13-19 digits, contiguous or grouped 4-4-4-4(-3) / 4-6-5 / 4-6-4 with one kind of
                 separator, a known issuer prefix with a length that issuer uses, and Luhn.
    iban         two capital letters, check digits, BBAN, optionally spaced in groups of four; the
                 length must be the country's and the mod-97 checksum must hold.
    ip_address   IPv4 (octets 0-255, no leading zeros, not followed by `.word`) not preceded by
                 a version word (`v`, `version`, `release`, `build`, `section`, ...), and IPv6
                 incl. compressed forms (validated by `ipaddress`; a compressed address needs a
                 digit and a group with a hex letter or four digits, so C++ `Add::add` and slices
                 `x[1::2]` are not addresses). Loopback, unspecified, multicast and reserved
                 addresses (127/8, 0.0.0.0, 224/4, 240/4 with netmasks like 255.255.255.0, ::1,
                 ::) identify no one and fill config snippets: not reported. Plain dotted quads
                 in other contexts (`"1.0.0.0"` as a version string) are reported.
    national_id  US SSN `ddd-dd-dddd` (area not 000/666/9xx, group not 00, serial not 0000);
                 UK NINO `AB123456C` (valid prefix letters, suffix A-D); Canadian SIN
                 `ddd-ddd-ddd` (Luhn); Spanish DNI `12345678Z` / NIE `X1234567L` (mod-23 letter);
                 Italian codice fiscale (check character); Indian Aadhaar `dddd dddd dddd`
                 (Verhoeff). Undelimited 9-digit SSNs/SINs are not detected: indistinguishable
                 from order numbers.
    secret       AWS access key ids (AKIA/ASIA + 16), GitHub tokens (ghp_/gho_/ghu_/ghs_/ghr_,
                 github_pat_), Slack xox[baprs]-, OpenAI-style sk-... (mixed case and digits),
                 Stripe sk_/rk_ live/test and pk_live_, Google AIza..., JWTs, PEM private key
                 blocks, passwords in URLs (`scheme://user:pw@host`), and values assigned to a
                 password/secret/api_key/token/... key (`=`, `:`, `:=`, `=>`) that look generated:
                 not a placeholder, code reference or class name, with a letter and a digit, and
                 either three character classes or >= 16 chars of >= 3 bits/char with >= 20%
                 digits. Only the value is a finding, so `password=[SECRET]` keeps the key.
                 Provider key and token formats (cloud, LLM APIs, source hosting, chat tools,
                 private keys, JWTs, ...) come from detect-secrets' rules: see secrets.py.

Overlaps are resolved in favour of the more specific type (secret > iban > credit_card >
national_id > email > ip_address > phone), then the longer finding.

Speed: a row pays for a pattern only when it could match: each digit pattern runs only when the
row holds as many digits as the pattern needs (counted once), email only around an "@", IPv6 only
with "::" or 7 colons, secrets only when a literal prefix or a key word occurs. Patterns start
with a character class and check the boundary before it with a lookbehind placed after that first
character: `re` then skips non-candidate positions in C (a leading lookbehind defeats that).
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
import string
from collections import Counter
from dataclasses import dataclass

from .secrets import find_secrets

EMAIL = "email"
PHONE = "phone"
CREDIT_CARD = "credit_card"
IBAN = "iban"
IP_ADDRESS = "ip_address"
NATIONAL_ID = "national_id"
SECRET = "secret"
PII_TYPES = (EMAIL, PHONE, CREDIT_CARD, IBAN, IP_ADDRESS, NATIONAL_ID, SECRET)
PLACEHOLDERS = {pii_type: f"[{pii_type.upper()}]" for pii_type in PII_TYPES}

_SPECIFICITY = {
    SECRET: 0, IBAN: 1, CREDIT_CARD: 2, NATIONAL_ID: 3, EMAIL: 4, IP_ADDRESS: 5, PHONE: 6,
}


@dataclass(frozen=True)
class Finding:
    type: str
    start: int
    end: int


def find_pii(text: str) -> list[Finding]:
    if not _may_hold_pii(text):
        return _without_overlaps([Finding(SECRET, f.start, f.end) for f in find_secrets(text)])
    found: list[Finding] = []
    if "@" in text:
        _find_emails(text, found)
    _find_secrets(text, found)
    digits = sum(map(text.count, "0123456789"))
    if digits >= 4 and "." in text:
        _find_ipv4(text, found)
    if digits >= 6:
        _find_national_ids(text, digits, found)
    if digits >= 8:
        _find_phones(text, digits, found)
        _find_ibans(text, found)
    if digits >= 13:
        _find_cards(text, found)
    if "::" in text or text.count(":") >= 7:
        _find_ipv6(text, found)
    return _without_overlaps(found)


# The pre-filter: every pattern of this module needs one of these characters (a digit, one of
# @ : = _ -, or the A or J of the AKIA/ASIA/AIza/eyJ token prefixes); ASCII text without any
# holds only what secrets.find_secrets finds. One C pass of bytes.translate decides it.
_PII_GATE_BYTES = b"0123456789@:=_-AJ"


def _may_hold_pii(text: str) -> bool:
    if not text.isascii():  # the patterns' \d also matches other scripts' digits
        return True
    raw = text.encode("ascii")
    return len(raw.translate(None, _PII_GATE_BYTES)) < len(raw)


def redact(text: str) -> tuple[str, Counter]:
    findings = find_pii(text)
    counts: Counter = Counter()
    parts: list[str] = []
    position = 0
    for finding in findings:
        parts.append(text[position:finding.start])
        parts.append(PLACEHOLDERS[finding.type])
        counts[finding.type] += 1
        position = finding.end
    parts.append(text[position:])
    return "".join(parts), counts


def _without_overlaps(found: list[Finding]) -> list[Finding]:
    """Keeps the most specific, then longest, findings; O(n log n) for rows with many."""
    if len(found) < 2:
        return found
    kept: list[Finding] = []  # sorted by start, pairwise disjoint
    kept_starts: list[int] = []
    for candidate in sorted(found, key=lambda f: (_SPECIFICITY[f.type], f.start - f.end, f.start)):
        at = bisect.bisect_right(kept_starts, candidate.start)
        if at and kept[at - 1].end > candidate.start:
            continue
        if at < len(kept) and kept[at].start < candidate.end:
            continue
        kept.insert(at, candidate)
        kept_starts.insert(at, candidate.start)
    return kept


# --- email -------------------------------------------------------------------------------------

# Matched from the "@" outwards: a pattern that starts at the local part would be tried at every
# letter of the row.
_EMAIL_LOCAL_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
_EMAIL_LOCAL_CHARS = frozenset(string.ascii_letters + string.digits + "._%+-")
_EMAIL_DOMAIN_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![\w-])"
)
_GENERIC_TLDS = frozenset(
    "com net org edu gov mil int info biz name pro mobi aero coop museum jobs travel tel asia "
    "cat xyz online site tech store app dev cloud email page blog shop live news world today "
    "space website club agency company solutions services consulting digital network systems "
    "group studio design media global life academy center university school health bank "
    "insurance law legal finance capital money ventures partners support software social "
    "family team works zone mail ltd inc llc gmbh local".split()
)
_URL_USERINFO_BEFORE_RE = re.compile(r"://[^\s/@]*$")


def _find_emails(text: str, found: list[Finding]) -> None:
    at = text.find("@")
    while at != -1:
        _find_email_at(text, at, found)
        at = text.find("@", at + 1)


def _find_email_at(text: str, at: int, found: list[Finding]) -> None:
    local = _EMAIL_LOCAL_PART_RE.search(text, max(0, at - 64), at)
    if local is None:
        return
    start = local.start()
    # the local part may have been cut at 64 characters: it must begin at a boundary
    if start and text[start - 1] in _EMAIL_LOCAL_CHARS:
        return
    domain = _EMAIL_DOMAIN_RE.match(text, at + 1)
    if domain is None:
        return
    tld = domain.group(1).lower()
    if len(tld) != 2 and tld not in _GENERIC_TLDS:
        return
    end = domain.end()
    following = text[end:end + 2]
    if following[:1] == "(":  # a method call: `q@k.transpose(`
        return
    if following[:1] == ":" and following[1:2].strip():  # SSH remote: git@host:org/repo
        return
    if _URL_USERINFO_BEFORE_RE.search(text, max(0, start - 256), start):
        return
    found.append(Finding(EMAIL, start, end))


# --- phone -------------------------------------------------------------------------------------

# North American, not the tail of a longer digit sequence (SI digit grouping: 4.359 744 722 2071).
_NANP_PHONE_RE = re.compile(
    r"[(\d](?<![\w+.-][(\d])(?<!\d[ .-][(\d])"
    r"(?:(?<=1)([ .-])[2-9]\d\d\1\d{3}\1"  # 1-800-555-0199, 1 555 123 4567
    r"|(?<=1)[ -]?\([2-9]\d\d\)[ .-]?\d{3}[ .-]"  # 1 (555) 123-4567
    r"|(?<=\()[2-9]\d\d\)[ .-]?\d{3}[ .-]"  # (555) 123-4567
    r"|(?<=[2-9])\d\d([ .-])\d{3}\2)"  # 555-123-4567, 555.123.4567
    r"\d{4}(?![\w-]|\.\d)"
)
# `+`, country code, then 7-14 more digits, each optionally after one separator or parenthesis.
_INTERNATIONAL_PHONE_RE = re.compile(
    r"\+(?<![\w+]\+)[1-9](?:[ .-]?\(?\d\)?){7,14}(?![\w-]|[ .-]?\d)"
)
# ITU-T E.164 country calling codes in use: "+2147483647" in code is not a phone number.
_COUNTRY_CALLING_CODES = frozenset(
    "1 7 20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 60 61 62 "
    "63 64 65 66 81 82 84 86 90 91 92 93 94 95 98 211 212 213 216 218 290 291 297 298 299 380 "
    "381 382 383 385 386 387 389 420 421 423 670 800 808 850 852 853 855 856 870 878 880 881 "
    "882 883 886 888 979 992 993 994 995 996 998".split()
) | {str(code) for code in (*range(220, 259), *range(260, 270), *range(350, 360),
                            *range(370, 379), *range(500, 510), *range(590, 600),
                            *range(672, 693), *range(960, 969), *range(970, 978))}


def _find_phones(text: str, digits: int, found: list[Finding]) -> None:
    if digits >= 10:
        for match in _NANP_PHONE_RE.finditer(text):
            found.append(Finding(PHONE, match.start(), match.end()))
    if "+" in text:
        for match in _INTERNATIONAL_PHONE_RE.finditer(text):
            number = match.group()
            if number.count("(") != number.count(")") or number.count("(") > 1:
                continue
            if number.count(".") == 1:  # a signed decimal: +35236450.6
                continue
            digits_only = "".join(char for char in number if char.isdigit())
            if any(digits_only[:n] in _COUNTRY_CALLING_CODES for n in (1, 2, 3)):
                found.append(Finding(PHONE, match.start(), match.end()))


# --- credit card -------------------------------------------------------------------------------

_CARD_RE = re.compile(
    r"\d(?<![\w+-]\d)(?<!\d[.,]\d)"
    r"(?:\d{12,18}|\d{3}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{3}([ -])\d{6}\2\d{4,5})"
    r"(?![\w-]|[ -]\d|\.\d)"
)
# (lowest prefix, highest prefix, card lengths): issuer identification numbers of the networks
# whose cards appear in text; an unknown prefix is far more often an order or tracking number.
_CARD_ISSUERS = (
    ("4", "4", (13, 16, 19)),  # Visa
    ("51", "55", (16,)),  # Mastercard
    ("2221", "2720", (16,)),  # Mastercard 2-series
    ("34", "34", (15,)),  # American Express
    ("37", "37", (15,)),
    ("6011", "6011", (16, 17, 18, 19)),  # Discover
    ("644", "649", (16, 17, 18, 19)),
    ("65", "65", (16, 17, 18, 19)),
    ("3528", "3589", (16, 17, 18, 19)),  # JCB
    ("300", "305", (14, 15, 16, 17, 18, 19)),  # Diners Club
    ("36", "36", (14, 15, 16, 17, 18, 19)),
    ("38", "39", (16, 17, 18, 19)),
    ("62", "62", (16, 17, 18, 19)),  # UnionPay
    ("2200", "2204", (16, 17, 18, 19)),  # Mir
    ("50", "50", (13, 14, 15, 16, 17, 18, 19)),  # Maestro
    ("56", "58", (13, 14, 15, 16, 17, 18, 19)),
    ("63", "63", (13, 14, 15, 16, 17, 18, 19)),
    ("67", "67", (13, 14, 15, 16, 17, 18, 19)),
)


def _find_cards(text: str, found: list[Finding]) -> None:
    for match in _CARD_RE.finditer(text):
        digits = match.group().replace(" ", "").replace("-", "")
        # 4-4-4-4 then a 3-digit group is a card followed by its CVV: redact both.
        if _is_card_number(digits) or (match.group(1) and _is_card_number(digits[:16])):
            found.append(Finding(CREDIT_CARD, match.start(), match.end()))


def _is_card_number(digits: str) -> bool:
    for low, high, lengths in _CARD_ISSUERS:
        prefix = digits[:len(low)]
        if low <= prefix <= high:
            return len(digits) in lengths and _luhn_valid(digits)
    return False


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# --- IBAN --------------------------------------------------------------------------------------

_IBAN_RE = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{1,4}){3,8}")
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def _find_ibans(text: str, found: list[Finding]) -> None:
    for match in _IBAN_RE.finditer(text):
        length = _IBAN_LENGTHS.get(match.group()[:2])
        if length is None:
            continue
        # The pattern may run on into a following code ("... 0130 00 EUR"): cut at the
        # country's length, then the IBAN must end there.
        end, alnum = match.start(), 0
        while alnum < length and end < match.end():
            alnum += text[end] != " "
            end += 1
        if alnum < length or (end < len(text) and text[end].isalnum()):
            continue
        spaced = text[match.start():end]
        groups = spaced.split(" ")
        if len(groups) > 1 and any(len(group) != 4 for group in groups[:-1]):
            continue
        if _iban_checksum_valid("".join(groups)):
            found.append(Finding(IBAN, match.start(), end))


def _iban_checksum_valid(compact: str) -> bool:
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


# --- IP address --------------------------------------------------------------------------------

_IPV4_RE = re.compile(r"\d(?<![\w.-]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w-]|\.\w)")
_VERSION_BEFORE_RE = re.compile(
    r"(?i)(?:\bv|\bversion|\bver\.?|\brelease|\brel\.?|\bbuild|\bsection|§)\s*[:#]?\s*$"
)
_IPV6_RE = re.compile(
    r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?![\w:])"
)
_HEX_LETTER_RE = re.compile(r"[A-Fa-f]")


def _find_ipv4(text: str, found: list[Finding]) -> None:
    for match in _IPV4_RE.finditer(text):
        start = match.start()
        try:  # octets 0-255, no leading zeros (01.02.03.04 is more likely a date)
            parsed = ipaddress.IPv4Address(match.group())
        except ValueError:
            continue
        if parsed.is_loopback or parsed.is_unspecified or parsed.is_multicast or parsed.is_reserved:
            continue  # no one's address; 240/4 also holds netmasks such as 255.255.255.0
        if _VERSION_BEFORE_RE.search(text, max(0, start - 16), start):
            continue
        found.append(Finding(IP_ADDRESS, start, match.end()))


def _find_ipv6(text: str, found: list[Finding]) -> None:
    for match in _IPV6_RE.finditer(text):
        candidate = match.group()
        try:
            address = ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        if address.is_loopback or address.is_unspecified:
            continue
        if "::" in candidate:
            groups = [group for group in candidate.split(":") if group]
            if not any(char.isdigit() for char in candidate):
                continue
            if not any(len(group) == 4 or _HEX_LETTER_RE.search(group) for group in groups):
                continue
        found.append(Finding(IP_ADDRESS, match.start(), match.end()))


# --- national id -------------------------------------------------------------------------------

_US_SSN_RE = re.compile(r"\d(?<![\w+.-]\d)\d\d-\d\d-\d{4}(?![\w-]|\.\d)")
_CANADA_SIN_RE = re.compile(r"[1-79](?<![\w+.-][1-79])\d\d-\d{3}-\d{3}(?![\w-]|\.\d)")
_UK_NINO_RE = re.compile(
    r"[A-CEGHJ-PR-TW-Z](?<![A-Za-z0-9][A-Z])[A-CEGHJ-NPR-TW-Z](?: ?\d{2}){3} ?[A-D](?![A-Za-z0-9])"
)
_UK_NINO_UNUSED_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})
# DNI: 8 digits and a letter; NIE: X, Y or Z, 7 digits and a letter. Not after "/": DOIs such
# as 10.1137/10081232X end that way.
_SPAIN_ID_RE = re.compile(
    r"[\dXYZ](?<![\w+./-][\dXYZ])(?:(?<=\d)\d{7}|(?<=[XYZ])-?\d{7})-?[A-Z](?![\w-])"
)
_SPAIN_CHECK_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
_ITALY_FISCAL_CODE_RE = re.compile(
    r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]{5}\d{2}[ABCDEHLMPRST]\d{2}[A-Z]\d{3}[A-Z](?![A-Za-z0-9])"
)
# Value of a character in an odd (1st, 3rd, ...) position of a codice fiscale, digits and
# letters sharing a row: 0/A, 1/B, ... 9/J, then K..Z.
_ITALY_ODD_VALUES = dict(
    zip("0123456789", (1, 0, 5, 7, 9, 13, 15, 17, 19, 21), strict=True)
) | dict(
    zip(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        (1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25,
         24, 23),
        strict=True,
    )
)
_INDIA_AADHAAR_RE = re.compile(
    r"[2-9](?<![\w+.-][2-9])\d{3}([ -])\d{4}\1\d{4}(?![\w-]|[ -]\d|\.\d)"
)
_VERHOEFF_MULTIPLY = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_PERMUTE = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 8, 7, 0, 6),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def _find_national_ids(text: str, digits: int, found: list[Finding]) -> None:
    if digits >= 9 and "-" in text:
        for match in _US_SSN_RE.finditer(text):
            area, group, serial = match.group().split("-")
            if area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000":
                found.append(Finding(NATIONAL_ID, match.start(), match.end()))
        for match in _CANADA_SIN_RE.finditer(text):
            if _luhn_valid(match.group().replace("-", "")):
                found.append(Finding(NATIONAL_ID, match.start(), match.end()))
    for match in _UK_NINO_RE.finditer(text):
        if match.group()[:2] not in _UK_NINO_UNUSED_PREFIXES:
            found.append(Finding(NATIONAL_ID, match.start(), match.end()))
    if digits >= 7:
        for match in _SPAIN_ID_RE.finditer(text):
            if _spanish_id_valid(match.group().replace("-", "")):
                found.append(Finding(NATIONAL_ID, match.start(), match.end()))
        for match in _ITALY_FISCAL_CODE_RE.finditer(text):
            if _italian_fiscal_code_valid(match.group()):
                found.append(Finding(NATIONAL_ID, match.start(), match.end()))
    if digits >= 12:
        for match in _INDIA_AADHAAR_RE.finditer(text):
            number = match.group()
            if _verhoeff_valid(number[:4] + number[5:9] + number[10:]):
                found.append(Finding(NATIONAL_ID, match.start(), match.end()))


def _spanish_id_valid(compact: str) -> bool:
    number = compact[:-1]
    if number[0] in "XYZ":  # NIE: the letter stands for a leading 0, 1 or 2
        number = str("XYZ".index(number[0])) + number[1:]
    return _SPAIN_CHECK_LETTERS[int(number) % 23] == compact[-1]


def _italian_fiscal_code_valid(code: str) -> bool:
    total = 0
    for position, char in enumerate(code[:15]):
        if position % 2 == 0:  # odd in the 1-based numbering of the specification
            total += _ITALY_ODD_VALUES[char]
        else:
            total += int(char) if char.isdigit() else ord(char) - 65
    return chr(65 + total % 26) == code[15]


def _verhoeff_valid(digits: str) -> bool:
    check = 0
    for position, char in enumerate(reversed(digits)):
        check = _VERHOEFF_MULTIPLY[check][_VERHOEFF_PERMUTE[position % 8][ord(char) - 48]]
    return check == 0


# --- secrets -----------------------------------------------------------------------------------

# Tokens whose prefix alone identifies them; the literals are checked with `in` first.
_PREFIXED_TOKEN_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?:AKIA|ASIA)[A-Z2-7]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{36,}"
    r"|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[baprs]-[A-Za-z0-9-]{10,}"
    r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}|pk_live_[A-Za-z0-9]{16,}"
    r"|AIza[A-Za-z0-9_-]{35}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
    r")(?![A-Za-z0-9])"
)
_TOKEN_PREFIXES = ("AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox",
                   "_live_", "_test_", "AIza", "eyJ")
_OPENAI_KEY_RE = re.compile(r"(?<![\w-])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}")
# Headers (Proc-Type, DEK-Info), then a base64 body, whose newlines may be escaped (a key in a
# string literal); a block cut short ends with its body. Code that merely mentions the markers
# has no body between them.
_PRIVATE_KEY_RE = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
    r"(?:(?:\s|\\[nr])*[A-Za-z-]+:[^\n\\]*)*"
    r"(?:[A-Za-z0-9+/=\s]|\\[nr]){40,}"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)?"
)
_URL_PASSWORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]+:([^\s:/@]+)@")
_SECRET_KEY_WORDS = ("pass", "pwd", "secret", "key", "token", "credential")
# The key word: password, passwd, pwd, secret(_key), client_secret, credential(s), api_key,
# access_key, access_token, auth_token, token, private_key; any case, `_` or `-` or nothing inside.
_ASSIGNED_SECRET_RE = re.compile(
    r"[pPsScCaAtT](?<![A-Za-z0-9][pPsScCaAtT])"
    r"(?i:(?<=p)(?:assw(?:or)?d|wd|rivate[_-]?key)|(?<=s)ecret(?:[_-]?key)?"
    r"|(?<=c)(?:lient[_-]?secret|redentials?)"
    r"|(?<=a)(?:pi[_-]?key|ccess[_-]?(?:key|token)|uth[_-]?token)|(?<=t)oken)"
    r"[\"']?\s*(?:=>|:=|=|:)\s*"
    r"(?:\"([^\"\s]{8,256})\"|'([^'\s]{8,256})'|([^\s\"'`,;)\]}]{8,256}))"
)
# Templates, placeholders and code expressions, not literal values.
_NOT_LITERAL_CHARS = frozenset("<>{}[]()$*%")
_PLACEHOLDER_WORDS = frozenset({"password", "pass", "passwd", "pwd", "secret", "changeme"})
_DOTTED_PATH_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_CAPITALIZED_WORD_RE = re.compile(r"[A-Z][a-z]{2,}")


def _find_secrets(text: str, found: list[Finding]) -> None:
    found.extend(Finding(SECRET, f.start, f.end) for f in find_secrets(text))
    if any(prefix in text for prefix in _TOKEN_PREFIXES):
        for match in _PREFIXED_TOKEN_RE.finditer(text):
            found.append(Finding(SECRET, match.start(), match.end()))
    if "sk-" in text:
        for match in _OPENAI_KEY_RE.finditer(text):
            if _has_digit_upper_lower(match.group()[3:]):
                found.append(Finding(SECRET, match.start(), match.end()))
    if "PRIVATE KEY-----" in text:
        for match in _PRIVATE_KEY_RE.finditer(text):
            found.append(Finding(SECRET, match.start(), match.end()))
    if "://" in text and "@" in text:
        for match in _URL_PASSWORD_RE.finditer(text):
            password = match.group(1)
            if (password.lower() not in _PLACEHOLDER_WORDS
                    and not _NOT_LITERAL_CHARS & set(password)):
                found.append(Finding(SECRET, match.start(1), match.end(1)))
    # an assigned secret needs its `=`, `:`, `:=` or `=>`: prose that says "pass" has none
    if ("=" in text or ":" in text) and any(map(text.lower().__contains__, _SECRET_KEY_WORDS)):
        for match in _ASSIGNED_SECRET_RE.finditer(text):
            group = match.lastindex or 0  # each alternative captures the value: never 0
            value = match.group(group)
            if group == 3:  # unquoted: a final "." ends the sentence, not the value
                value = value.rstrip(".")
            if _looks_generated(value):
                start = match.start(group)
                found.append(Finding(SECRET, start, start + len(value)))


def _has_digit_upper_lower(value: str) -> bool:
    return (
        any(char.isdigit() for char in value)
        and any(char.isupper() for char in value)
        and any(char.islower() for char in value)
    )


def _looks_generated(value: str) -> bool:
    """A literal secret rather than a word, a placeholder or a reference to one."""
    if _NOT_LITERAL_CHARS & set(value) or _DOTTED_PATH_RE.fullmatch(value):
        return False
    # mostly capitalized words: a type or class name (`private_key: PKCS7PrivateKeyTypes`)
    if sum(map(len, _CAPITALIZED_WORD_RE.findall(value))) >= 0.6 * len(value):
        return False
    digits = sum(char.isdigit() for char in value)
    if digits == 0 or not any(char.isalpha() for char in value):
        return False
    has_symbol = any(not char.isalnum() and char not in "_.-" for char in value)
    has_lower = any(char.islower() for char in value)
    has_upper = any(char.isupper() for char in value)
    if has_lower + has_upper + has_symbol >= 2:  # with the digit: three character classes
        return True
    return len(value) >= 16 and digits >= 0.2 * len(value) and _entropy_bits(value) >= 3.0


def _entropy_bits(value: str) -> float:
    """Shannon entropy per character."""
    length = len(value)
    return -sum(n / length * math.log2(n / length) for n in Counter(value).values())
