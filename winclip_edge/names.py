"""Names that travel: one rule for product and station names, and the outward names built from them.

A product or station name becomes a folder in the bundle, a path segment of the API, an MQTT topic level,
a Prometheus label, an OPC UA browse name and a Modbus map key. One rule that is safe in all of them is
checked here, once, with one message; every command and face calls :func:`check_name`. The object name of
the prompts ("metal nut") is free text and never a name (``--object-name``).

The rule: 1 to 64 characters from ``A-Z a-z 0-9 _ - .``, starting with a letter or digit and not ending with
``.``. So no path separator, no ``..`` segment, no hidden file, no MQTT wildcard (``+ #``), no ``$`` topic,
no white space or shell metacharacter, no URL escape, and the same bytes on every file system. Names that
differ only in case are distinct to Linux but not to every file system a bundle is copied to: a new name
that equals an existing one but for case is refused where names are created (:func:`check_new_name`).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable

from .errors import WinclipError

MAX_NAME = 64
NAME_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9_-])?")
NAME_RULE = ("1-64 characters: letters A-Z a-z, digits, '_', '-' or '.', starting with a letter or digit and not "
             "ending with '.'")
MAX_TOPIC_BYTES = 65535  # MQTT 3.1.1 / 5: a UTF-8 string of at most 65535 bytes
MAX_STEM = 100  # characters of an output file stem (the hash suffix included)


class InvalidName(WinclipError, ValueError):
    """A product, station or topic name that breaks the rule (the message says which rule)."""


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def check_name(name: object, what: str = "product") -> str:
    """``name`` when it follows the rule, else InvalidName with the one message every face shows."""
    if not is_valid_name(name):
        raise InvalidName(f"{what} name {name!r} is not valid: use {NAME_RULE}")
    return name  # type: ignore[return-value]


def check_new_name(name: object, existing: Iterable[str], what: str = "product") -> str:
    """:func:`check_name`, and not equal to an existing name but for case (a copy to a case-insensitive
    file system would merge the two)."""
    name = check_name(name, what)
    clash = [e for e in existing if e != name and e.casefold() == name.casefold()]
    if clash:
        raise InvalidName(f"{what} name {name!r} differs from the existing {clash[0]!r} only in case; choose "
                          "another name")
    return name


def suggest_name(text: str) -> str:
    """A valid name made from free text (for rename hints and default station names): accents dropped,
    other characters -> '_', cut to the limit. Never empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_text).strip("._-")[:MAX_NAME].rstrip(".")
    return name if is_valid_name(name) else "unnamed"


# ---------------------------------------------------------------- MQTT topics
def check_topic(topic: object, what: str = "--mqtt-topic") -> str:
    """A topic a client may publish to: no wildcard (``+``, ``#``), not starting with ``$`` (reserved for the
    broker), no NUL, not empty, at most 65535 UTF-8 bytes."""
    if not isinstance(topic, str) or not topic:
        raise InvalidName(f"{what} {topic!r} is not a topic: give levels separated by '/', e.g. winclip/line1/result")
    if "+" in topic or "#" in topic:
        raise InvalidName(f"{what} {topic!r} contains an MQTT wildcard ('+' or '#'): a publish topic cannot")
    if topic.startswith("$"):
        raise InvalidName(f"{what} {topic!r} starts with '$': such topics are the broker's own")
    if "\x00" in topic:
        raise InvalidName(f"{what} {topic!r} contains a NUL character")
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise InvalidName(f"{what} is {len(topic.encode())} bytes long; MQTT allows {MAX_TOPIC_BYTES}")
    return topic


def topic(*levels: str) -> str:
    """A topic from levels that are constants or checked names (each level is checked: no '/', no wildcard)."""
    for level in levels:
        if not level or "/" in level:
            raise InvalidName(f"topic level {level!r}: a level is a non-empty name without '/'")
    return check_topic("/".join(levels), "topic")


# ---------------------------------------------------------------- output file names
def safe_stem(filename: str, used: set[str] | None = None) -> str:
    """A file stem for the outputs of an input named ``filename`` (any text: unicode, '..', very long, names
    that differ only in case): ASCII letters, digits, '_', '-', '.', at most MAX_STEM characters, never hidden,
    and -- with ``used`` -- unique among this run's stems compared without case (``part``, ``Part`` ->
    ``part``, ``Part-2``). A stem that had to change keeps a short hash of the original, so two different
    names never map to one file."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    clean = suggest_name(stem) if stem else "image"
    if clean == "unnamed" and not is_valid_name(stem):
        clean = "image"
    if clean != stem or len(stem) > MAX_STEM:
        digest = hashlib.sha256(filename.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        clean = f"{clean[:MAX_STEM - 9]}-{digest}"
    if used is None:
        return clean
    folded = {u.casefold() for u in used}
    name, n = clean, 1
    while name.casefold() in folded:
        n += 1
        name = f"{clean}-{n}"
    used.add(name)
    return name


__all__ = ["InvalidName", "MAX_NAME", "NAME_PATTERN", "NAME_RULE", "check_name", "check_new_name", "check_topic",
           "is_valid_name", "safe_stem", "suggest_name", "topic"]
