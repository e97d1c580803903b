"""JSON Schema string formats as regular expressions (whole-string, `re.ASCII` semantics).

Each format is written once as a regex and compiled by the regex front-end, so formats share its
exactness and its JSON spelling rules. The languages follow the RFCs, narrowed where the reference
validators (`jsonschema`'s format checkers) are narrower, so that everything we emit validates:
- date, time, date-time: RFC 3339 `full-date`, `full-time`, `date-time` with the real number of days
  in each month (leap years included); no year 0000 and no leap second `:60` (rfc3339-validator and
  `datetime` reject them); `T`/`Z` in either case.
- email: RFC 5321 dot-atom local part `@` a domain name or `[IPv4]` literal; quoted local parts and
  IPv6 literals are not generated.
- uuid: 8-4-4-4-12 hex digits, either case.
- uri: RFC 3986 `URI` (scheme, hierarchical part, optional query and fragment).
- ipv4: dotted quad, no leading zeros. ipv6: RFC 4291 text forms incl. `::` and an IPv4 tail, no zone.
"""

from __future__ import annotations

_DEC_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV4 = rf"{_DEC_OCTET}(?:\.{_DEC_OCTET}){{3}}"

_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H16}:{_H16}|{IPV4})"


def _ipv6() -> str:
    """RFC 3986 `IPv6address`: n groups before `::` (n <= 7 - after), `after` groups and ls32 after it."""
    forms = [rf"(?:{_H16}:){{6}}{_LS32}", rf"::(?:{_H16}:){{5}}{_LS32}"]
    # [ *k( h16 ":" ) h16 ] "::" tail, for k = 0..6, tail shrinking as the head may grow.
    tails = [rf"(?:{_H16}:){{4}}{_LS32}", rf"(?:{_H16}:){{3}}{_LS32}", rf"(?:{_H16}:){{2}}{_LS32}",
             rf"{_H16}:{_LS32}", _LS32, _H16, ""]
    for k, tail in enumerate(tails):
        head = rf"(?:(?:{_H16}:){{0,{k}}}{_H16})?"
        forms.append(rf"{head}::{tail}")
    return "(?:" + "|".join(forms) + ")"


IPV6 = _ipv6()

_DAY_31 = r"(?:0[1-9]|[12][0-9]|3[01])"
_DAY_30 = r"(?:0[1-9]|[12][0-9]|30)"
_DAY_28 = r"(?:0[1-9]|1[0-9]|2[0-8])"
_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
# Divisible by 4 and not by 100, or divisible by 400 (year 0000 excluded).
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-{_DAY_31}|(?:0[469]|11)-{_DAY_30}|02-{_DAY_28})"
    rf"|{_LEAP_YEAR}-02-29)"
)
_OFFSET = r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
TIME = rf"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?{_OFFSET}"
DATE_TIME = rf"{DATE}[Tt]{TIME}"

UUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_LABEL}(?:\.{_LABEL})*|\[{IPV4}\])"

_UNRESERVED = r"A-Za-z0-9\-._~"
_SUB_DELIMS = r"!$&'()*+,;="
_PCT = r"%[0-9A-Fa-f]{2}"
_PCHAR = rf"(?:[{_UNRESERVED}{_SUB_DELIMS}:@]|{_PCT})"
_SEGMENT = rf"{_PCHAR}*"
_SEGMENT_NZ = rf"{_PCHAR}+"
_USERINFO = rf"(?:[{_UNRESERVED}{_SUB_DELIMS}:]|{_PCT})*"
_IP_LITERAL = rf"\[(?:{IPV6}|[vV][0-9A-Fa-f]+\.[{_UNRESERVED}{_SUB_DELIMS}:]+)\]"
_REG_NAME = rf"(?:[{_UNRESERVED}{_SUB_DELIMS}]|{_PCT})*"
_AUTHORITY = rf"(?:{_USERINFO}@)?(?:{_IP_LITERAL}|{_REG_NAME})(?::[0-9]*)?"
_HIER_PART = (
    rf"(?://{_AUTHORITY}(?:/{_SEGMENT})*"  # "//" authority path-abempty
    rf"|/(?:{_SEGMENT_NZ}(?:/{_SEGMENT})*)?"  # path-absolute
    rf"|{_SEGMENT_NZ}(?:/{_SEGMENT})*"  # path-rootless
    r"|)"  # path-empty
)
_QUERY = rf"(?:{_PCHAR}|[/?])*"
URI = rf"[A-Za-z][A-Za-z0-9+\-.]*:{_HIER_PART}(?:\?{_QUERY})?(?:#{_QUERY})?"

FORMATS: dict[str, str] = {
    "date": DATE,
    "time": TIME,
    "date-time": DATE_TIME,
    "email": EMAIL,
    "uuid": UUID,
    "uri": URI,
    "ipv4": IPV4,
    "ipv6": IPV6,
}
