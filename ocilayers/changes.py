"""Dockerfile-syntax config changes (`commit -c/--change`, `append -c`): parse one instruction,
apply a list of them to an image config.

The rules are moby's for `docker commit --change`: `BuildFromConfig` (daemon/builder/dockerfile/
builder.go) parses the changes as a Dockerfile with BuildKit's parser and runs each through the
classic builder's dispatchers (dispatchers.go) on a copy of the container config, expanding `$VAR`
against that config's `Env` as it goes. Deliberate differences, each named where it is decided:

- STOPSIGNAL is accepted (dockerd 20.10 refuses it; moby 23+ takes it, and OCI has `StopSignal`).
- dockerd's commit then merges the result with the container config (daemon/commit.go `merge`),
  which undoes some changes: `ENTRYPOINT []` comes back as the old entrypoint and command, `CMD []`
  without an entrypoint as the old command, and a new HEALTHCHECK inherits the old one's
  intervals and retries. ocilayers applies the changes as a Dockerfile does and skips that merge.
- Input that dockerd accepts but that only breaks later is refused: a bare `CMD`/`ENTRYPOINT`
  (dockerd writes `["/bin/sh", "-c"]`), an ONBUILD trigger that is no Dockerfile instruction,
  options on `HEALTHCHECK NONE` (dockerd ignores them), a numeric STOPSIGNAL outside 1-64, and an
  ENV or LABEL name that expands to nothing.
- One instruction per change: dockerd joins all changes with newlines, so a line break inside
  one starts another instruction there. Continuation lines (a trailing backslash) are joined.

Linux rules only (default shell `/bin/sh -c`, `/` paths): overlay2 images are Linux images.
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ocilayers.errors import ChangeError, ImageError

INSTRUCTIONS = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "USER", "VOLUME", "WORKDIR",
                "STOPSIGNAL", "HEALTHCHECK", "ONBUILD")
"""What a change may be (moby's validCommitCommands, plus STOPSIGNAL), in the order messages
list them."""

# Dockerfile instructions an ONBUILD trigger may be (the Dockerfile reference; ONBUILD, FROM and
# MAINTAINER are refused as triggers by BuildKit's parseOnBuild).
_TRIGGERS = frozenset({"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "HEALTHCHECK",
                       "LABEL", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"})

DEFAULT_SHELL = ("/bin/sh", "-c")
"""What a shell-form CMD/ENTRYPOINT runs under when the config has no `Shell`."""

# BuildKit's parser splits on these (reWhitespace): not on "\n", which ends a line.
_WS = re.compile(r"[\t\v\f\r ]+")
# A line continues when it ends in an unescaped backslash (BuildKit's lineContinuationRegex).
_CONTINUATION = re.compile(r"([^\\])\\[ \t]*$|^\\[ \t]*$")
_ONBUILD_PREFIX = re.compile(r"^\s*ONBUILD\s*", re.IGNORECASE)

# HEALTHCHECK options: flag name -> config field (docker-image-spec HealthcheckConfig).
_HEALTH_DURATIONS = {"interval": "Interval", "timeout": "Timeout",
                     "start-period": "StartPeriod", "start-interval": "StartInterval"}
_HEALTH_FIELDS = ("Test", "Interval", "Timeout", "StartPeriod", "StartInterval", "Retries")

# moby/sys/signal's SignalMap for Linux (names without "SIG").
_SIGNALS = frozenset(
    ["ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
     "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
     "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
     "RTMIN", "RTMAX"]
    + [f"RTMIN+{i}" for i in range(1, 16)] + [f"RTMAX-{i}" for i in range(1, 15)])

_PORT_PROTOCOLS = ("tcp", "udp", "sctp")


@dataclass(frozen=True)
class Change:
    """One parsed change instruction. Arguments are kept as written (quotes in, `$VAR` not yet
    expanded): `apply_changes` expands them against the config's `Env` at that point, as dockerd
    does.

    `args` per instruction: CMD/ENTRYPOINT the exec-form argv, or the shell-form command line as
    one string (`exec_form` says which); EXPOSE and VOLUME the words; USER, WORKDIR and
    STOPSIGNAL the one argument; HEALTHCHECK the `Test` list (`options` holds the durations in
    nanoseconds and `Retries`); ONBUILD the trigger as written. `pairs` holds ENV's and LABEL's
    names and values.
    """

    instruction: str
    text: str
    args: tuple[str, ...] = ()
    exec_form: bool = False
    pairs: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        return self.text


# --- parsing -------------------------------------------------------------------------------

def parse_change(text: str) -> Change:
    """Parse one change instruction (`ENV A=1`, `CMD ["sh"]`, ...); the keyword is
    case-insensitive. Raises ChangeError for anything dockerd would refuse (and for the few
    things listed in the module docstring that it accepts but ocilayers does not)."""
    lines = _logical_lines(text)
    if not lines:
        raise ChangeError("empty change: give an instruction such as 'ENV KEY=value'")
    if len(lines) > 1:
        raise ChangeError(f"change {text!r} holds {len(lines)} instructions: "
                          "give each its own change")
    line = lines[0]
    keyword = _split_command(line)[0]
    if keyword.upper() not in INSTRUCTIONS:
        raise ChangeError(f"unknown change instruction {keyword!r}: "
                          f"allowed are {', '.join(INSTRUCTIONS)}")
    try:
        return _parse_line(line)
    except _Invalid as exc:
        raise ChangeError(f"change {line.strip()!r}: {exc}") from None


class _Invalid(Exception):
    """A reason a change is invalid; parse_change and apply_changes add which change."""


def _parse_line(line: str) -> Change:
    """One instruction whose keyword is in INSTRUCTIONS."""
    keyword, flags, rest = _split_command(line)
    instruction = keyword.upper()
    if instruction == "HEALTHCHECK":
        return _parse_healthcheck(line.strip(), flags, rest)
    if flags:  # BuildKit's BFlags: only HEALTHCHECK has options among these
        raise _Invalid(f"unknown flag: {flags[0].partition('=')[0]}")
    return _PARSERS[instruction](instruction, line, rest)


def _logical_lines(text: str) -> list[str]:
    """The instructions in `text`, as BuildKit's parser finds them: comment lines and blank
    lines skipped, continuation lines joined (the first line left-trimmed, the others not)."""
    raw = [ln.rstrip("\r\n") for ln in text.split("\n")]
    out: list[str] = []
    i = 0
    while i < len(raw):
        line = raw[i].lstrip()
        i += 1
        if line.startswith("#"):
            continue
        line, done = _trim_continuation(line)
        if done and not line:
            continue
        parts = [line]
        while not done and i < len(raw):
            nxt = raw[i]
            i += 1
            if nxt.lstrip().startswith("#") or not nxt.strip():
                continue  # comments and empty lines inside a continued instruction
            nxt, done = _trim_continuation(nxt)
            parts.append(nxt)
        out.append("".join(parts))
    return out


def _trim_continuation(line: str) -> tuple[str, bool]:
    """`line` without its continuation backslash, and whether the instruction ends there."""
    if _CONTINUATION.search(line):
        return _CONTINUATION.sub(r"\1", line, count=1), False
    return line, True


def _split_command(line: str) -> tuple[str, list[str], str]:
    """Keyword, leading `--flag` words and the rest (BuildKit's splitCommand)."""
    parts = _WS.split(line.strip(), maxsplit=1)
    if len(parts) < 2:
        return parts[0], [], ""
    rest, flags = _extract_flags(parts[1])
    return parts[0], flags, rest.strip()


def _extract_flags(line: str) -> tuple[str, list[str]]:
    """Split leading words that start with `--` off `line` (quotes and backslashes in them
    processed); a lone `--` ends them. Returns the rest and the flag words."""
    words: list[str] = []
    pos, n = 0, len(line)
    while pos < n:
        while pos < n and line[pos].isspace():
            pos += 1
        if pos == n:
            break
        if not line.startswith("--", pos):
            return line[pos:], words
        buf: list[str] = []
        quote = ""
        blank_ok = False
        while pos < n and (quote or not line[pos].isspace()):
            ch = line[pos]
            pos += 1
            if quote and ch == quote:
                quote = ""
                continue
            if not quote and ch in "'\"":
                quote, blank_ok = ch, True
                continue
            if ch == "\\":
                if pos == n:
                    break  # a trailing backslash is dropped
                ch = line[pos]
                pos += 1
            buf.append(ch)
        word = "".join(buf)
        if word == "--":
            return line[pos:], words
        if word or blank_ok:
            words.append(word)
    return "", words


def _parse_words(rest: str) -> list[str]:
    """Split `rest` into words on whitespace outside quotes, keeping quotes and backslashes
    (they are processed later, with `$VAR`): BuildKit's parseWords for ENV and LABEL."""
    words: list[str] = []
    buf: list[str] = []
    quote = ""
    in_word = blank_ok = False
    i, n = 0, len(rest)
    while i < n:
        ch = rest[i]
        i += 1
        if not in_word:
            if ch.isspace():
                continue
            in_word = True
        if quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"':  # nothing escapes inside '...'
                if i == n:
                    quote = ""
                    continue
                buf.append(ch)
                ch = rest[i]
                i += 1
            buf.append(ch)
            continue
        if ch.isspace():
            if blank_ok or buf:
                words.append("".join(buf))
            buf, in_word, blank_ok = [], False, False
            continue
        if ch in "'\"":
            quote, blank_ok = ch, True
        elif ch == "\\":
            if i == n:
                continue  # a trailing backslash is dropped
            buf.append(ch)
            ch = rest[i]
            i += 1
        buf.append(ch)
    if in_word and (blank_ok or buf):
        words.append("".join(buf))
    return words


def _json_array(rest: str) -> list[str] | None:
    """`rest` as a JSON array of strings (the exec form), or None when it is no JSON array (then
    it is the shell form, as in dockerd: `CMD [ -f /x ] && y` is a shell command). A valid
    array holding anything but strings is an error."""
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, list):
        return None
    if not all(isinstance(v, str) for v in value):
        raise _Invalid("when using JSON array syntax, arrays must be comprised of strings only")
    # Go's decoder turns a lone surrogate escape into U+FFFD; Python keeps it (unencodable).
    return [re.sub("[\ud800-\udfff]", "\ufffd", v) for v in value]


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: Go's decoder refuses them


def _parse_command(instruction: str, line: str, rest: str) -> Change:
    if not rest:
        # dockerd turns a bare CMD into ["/bin/sh", "-c"] and ignores a bare ENTRYPOINT.
        raise _Invalid(f"{instruction} requires at least one argument")
    argv = _json_array(rest)
    if argv is None:
        return Change(instruction, line.strip(), (rest,))
    return Change(instruction, line.strip(), tuple(argv), exec_form=True)


def _parse_pairs(instruction: str, line: str, rest: str) -> Change:
    """ENV and LABEL: `k=v k2="v 2"`, or the legacy `k value with spaces` (BuildKit's
    parseNameVal: the form is set by whether the first word has a `=`)."""
    words = _parse_words(rest)
    if not words:
        raise _Invalid(f"{instruction} requires at least one argument")
    pairs: list[tuple[str, str]] = []
    if "=" not in words[0]:
        parts = _WS.split(rest, maxsplit=1)
        if len(parts) < 2:
            raise _Invalid(f"{instruction} must have two arguments")
        pairs.append((parts[0], parts[1]))
    else:
        for word in words:
            if "=" not in word:
                raise _Invalid(f"syntax error - can't find = in {word!r}. "
                               "Must be of the form: name=value")
            key, _, value = word.partition("=")
            if not key:
                raise _Invalid(f"{instruction} names can not be blank")
            pairs.append((key, value))
    for key, value in pairs:
        _check_syntax(key)
        _check_syntax(value)
    return Change(instruction, line.strip(), pairs=tuple(pairs))


def _parse_expose(instruction: str, line: str, rest: str) -> Change:
    if not rest:
        raise _Invalid("EXPOSE requires at least one argument")
    words = tuple(_WS.split(rest))
    for word in words:
        _check_syntax(word)
        if "$" not in word:
            for spec in _expand_words(word, _no_env):
                _port_keys(spec)
    return Change(instruction, line.strip(), words)


def _parse_volume(instruction: str, line: str, rest: str) -> Change:
    items = _json_array(rest)
    exec_form = items is not None
    if items is None:
        items = _WS.split(rest) if rest else []
    if not items:
        raise _Invalid("VOLUME requires at least one argument")
    out = []
    for item in items:
        item = item.strip()
        if not item:
            raise _Invalid("VOLUME specified can not be an empty string")
        _check_syntax(item)
        out.append(item)
    return Change(instruction, line.strip(), tuple(out), exec_form=exec_form)


def _parse_single(instruction: str, line: str, rest: str) -> Change:
    """USER, WORKDIR, STOPSIGNAL: the whole rest is the one argument (spaces included)."""
    if not rest:
        raise _Invalid(f"{instruction} requires exactly one argument")
    _check_syntax(rest)
    if "$" not in rest:
        _check_single(instruction, _expand(rest, _no_env))
    return Change(instruction, line.strip(), (rest,))


def _check_single(instruction: str, value: str) -> None:
    if instruction == "WORKDIR" and not value:
        raise _Invalid("WORKDIR cannot be empty")
    if instruction == "STOPSIGNAL":
        _check_signal(value)


def _parse_onbuild(instruction: str, line: str, rest: str) -> Change:
    if not rest:
        raise _Invalid("ONBUILD requires at least one argument")
    keyword, _, trigger_rest = _split_command(rest)
    trigger = keyword.upper()
    if trigger == "ONBUILD":
        raise _Invalid("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if trigger in ("MAINTAINER", "FROM"):
        raise _Invalid(f"{trigger} isn't allowed as an ONBUILD trigger")
    if trigger not in _TRIGGERS:  # dockerd stores it; a build on the image would fail
        raise _Invalid(f"unknown ONBUILD trigger instruction {keyword!r}")
    if trigger in INSTRUCTIONS:  # checked now, as dockerd's parser does (and a bit more)
        try:
            _parse_line(rest)
        except _Invalid as exc:
            raise _Invalid(f"trigger {keyword}: {exc}") from None
    elif trigger != "ARG":  # RUN, SHELL, ADD, COPY: their parser checks a JSON array too
        _json_array(trigger_rest)
    # dockerd stores the trigger as written (keyword case and trailing spaces kept).
    expression = _ONBUILD_PREFIX.sub("", line, count=1)
    return Change(instruction, line.strip(), (expression,))


def _parse_healthcheck(text: str, flags: list[str], rest: str) -> Change:
    if not rest:
        raise _Invalid("HEALTHCHECK requires at least one argument")
    parts = re.split(r"\s+", rest, maxsplit=1)
    kind, command = parts[0], (parts[1] if len(parts) > 1 else "")
    kind = kind.upper()
    if kind == "NONE":
        if command:
            raise _Invalid("HEALTHCHECK NONE takes no arguments")
        if flags:  # dockerd ignores them
            raise _Invalid("HEALTHCHECK NONE takes no options")
        return Change("HEALTHCHECK", text, ("NONE",))
    options = _health_options(flags)
    if kind != "CMD":
        raise _Invalid(f"unknown type {parts[0]!r} in HEALTHCHECK (try CMD or NONE)")
    argv = _json_array(command) if command else None
    if argv is not None:
        test = ("CMD", *argv)
    elif command:
        test = ("CMD-SHELL", command)
    else:
        test = ("CMD",)
    if len(test) == 1:
        raise _Invalid("missing command after HEALTHCHECK CMD")
    return Change("HEALTHCHECK", text, test, exec_form=argv is not None, options=options)


def _health_options(flags: list[str]) -> tuple[tuple[str, int], ...]:
    """`--interval=D --timeout=D --start-period=D --start-interval=D --retries=N` (each at most
    once, `=` required, as BuildKit's BFlags): the config fields they set, zero ones left out."""
    seen: dict[str, str] = {}
    for flag in flags:
        name, has_value, value = flag.partition("=")
        key = name[2:]
        if key not in _HEALTH_DURATIONS and key != "retries":
            raise _Invalid(f"unknown flag: {name} (HEALTHCHECK takes --interval, --timeout, "
                           "--start-period, --start-interval, --retries)")
        if key in seen:
            raise _Invalid(f"duplicate flag specified: {name}")
        if not has_value:
            raise _Invalid(f"missing a value on flag: {name} (write {name}=VALUE)")
        seen[key] = value
    out: list[tuple[str, int]] = []
    for key, fieldname in _HEALTH_DURATIONS.items():
        value = seen.get(key, "")
        if not value:
            continue
        try:
            ns = parse_duration(value)
        except ValueError as exc:
            raise _Invalid(f"--{key}: {exc}") from None
        if ns == 0:
            continue
        if ns < 1_000_000:
            raise _Invalid(f"--{key} must be at least 1ms (or 0 for the default), "
                           f"not {value!r}")
        out.append((fieldname, ns))
    retries = seen.get("retries", "")
    if retries:
        if not re.fullmatch(r"[+-]?[0-9]+", retries) or not -2**31 <= int(retries) < 2**31:
            raise _Invalid(f"--retries must be an integer, not {retries!r}")
        if int(retries) < 0:
            raise _Invalid(f"--retries cannot be negative ({int(retries)})")
        if int(retries):
            out.append(("Retries", int(retries)))
    return tuple(out)


_PARSERS: dict[str, Callable[[str, str, str], Change]] = {
    "CMD": _parse_command, "ENTRYPOINT": _parse_command,
    "ENV": _parse_pairs, "LABEL": _parse_pairs,
    "EXPOSE": _parse_expose, "VOLUME": _parse_volume,
    "USER": _parse_single, "WORKDIR": _parse_single, "STOPSIGNAL": _parse_single,
    "ONBUILD": _parse_onbuild,
}


# --- values: durations, ports, signals -------------------------------------------------------

_DURATION_UNITS = {"ns": 1, "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000, "ms": 1_000_000,
                   "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")
_MAX_NS = 1 << 63


def parse_duration(text: str) -> int:
    """A Go duration (`90s`, `1m30s`, `1.5h`, `300ms`; Go's time.ParseDuration) in nanoseconds.
    Raises ValueError."""
    s = text
    negative = s[:1] == "-"
    if s[:1] in ("-", "+"):
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    while s:
        m = _DURATION_PART.match(s)
        assert m is not None  # every group may be empty
        whole, fraction, unit = m.groups()
        if not whole and not fraction:
            raise ValueError(f"invalid duration {text!r}")
        if not unit:
            raise ValueError(f"missing unit in duration {text!r}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        s = s[m.end():]
        scale = _DURATION_UNITS[unit]
        value = int(whole or "0")
        if value > _MAX_NS // scale:
            raise ValueError(f"invalid duration {text!r}")
        value *= scale
        if fraction:
            digits, divisor = 0, 1.0
            for ch in fraction:  # digits past int64 are ignored, as Go does
                if digits > (_MAX_NS - 1) // 10 or digits * 10 + int(ch) > _MAX_NS:
                    break
                digits, divisor = digits * 10 + int(ch), divisor * 10
            # Go adds the fraction in float64 (exact to the ns for fractions of an hour).
            value += int(float(digits) * (float(scale) / divisor))
        total += value
        if total > _MAX_NS:
            raise ValueError(f"invalid duration {text!r}")
    if negative:
        return -total
    if total >= _MAX_NS:
        raise ValueError(f"invalid duration {text!r}")
    return total


def _port_number(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) > 65535:
        raise ValueError(text)
    return int(text)


def _port_range(text: str) -> tuple[int, int]:
    start, dash, end = text.partition("-")
    low = _port_number(start)
    if not dash or start == end:
        return low, low
    high = _port_number(end)
    if high < low:
        raise ValueError(text)
    return low, high


def _port_keys(spec: str) -> list[str]:
    """The ExposedPorts keys of one EXPOSE word: `80` -> `80/tcp`, `53/UDP` -> `53/udp`,
    `8000-8002` -> three. Like dockerd (parsePortSpec) it also takes the `-p` forms
    `[IP:][HOSTPORT:]PORT`, checks them and exposes PORT."""
    parts = spec.split(":")
    ip, host, container = ":".join(parts[:-2]), (parts[-2] if len(parts) > 1 else ""), parts[-1]
    port, _, proto = container.partition("/")
    if not port:
        raise _Invalid(f"no port specified in {spec!r}")
    proto = (proto or "tcp").lower()
    if proto not in _PORT_PROTOCOLS:
        raise _Invalid(f"invalid protocol {proto!r} in {spec!r} (tcp, udp or sctp)")
    if ip:
        if ip.startswith("["):
            if not ip.endswith("]"):
                raise _Invalid(f"invalid IP address {ip!r} in {spec!r}")
            ip = ip[1:-1]
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise _Invalid(f"invalid IP address {ip!r} in {spec!r}") from None
    try:
        low, high = _port_range(port)
    except ValueError:
        raise _Invalid(f"invalid port {port!r} in {spec!r} (0-65535, or a range "
                       "such as 8000-8002)") from None
    if host:
        try:
            host_low, host_high = _port_range(host)
        except ValueError:
            raise _Invalid(f"invalid host port {host!r} in {spec!r}") from None
        if high - low != host_high - host_low and high != low:
            raise _Invalid(f"invalid ranges specified for container and host ports in {spec!r}")
    return [f"{p}/{proto}" for p in range(low, high + 1)]


def _check_signal(value: str) -> None:
    """A signal name (`SIGTERM`, `term`, `RTMIN+3`) or number 1-64 (moby/sys/signal's
    ParseSignal, which takes any non-zero integer)."""
    if re.fullmatch(r"[0-9]+", value):
        if 1 <= int(value) <= 64:
            return
    else:
        name = value.upper()
        if name.startswith("SIG"):
            name = name[3:]
        if name in _SIGNALS:
            return
    raise _Invalid(f"invalid signal {value!r} (a name such as SIGTERM, or a number 1-64)")


def _clean_path(path: str) -> str:
    """Go's path.Clean for an absolute path (Python keeps a leading `//`, Go does not)."""
    out = posixpath.normpath(path)
    return "/" + out.lstrip("/") if out.startswith("//") else out


# --- words: quotes, backslashes, $VAR ---------------------------------------------------------
#
# BuildKit's shell.Lex with `\` as the escape token: '...' is literal; in "..." a backslash
# escapes only " $ and \; outside quotes it escapes anything; $NAME, ${NAME}, ${NAME:-word},
# ${NAME-word}, ${NAME:+word}, ${NAME+word}, ${NAME:?msg}, ${NAME?msg}, ${NAME#pat},
# ${NAME##pat}, ${NAME%pat}, ${NAME%%pat}, ${NAME/pat/repl}, ${NAME//pat/repl}. An unset
# variable is empty. Nothing else of the shell (no `$(...)`, no globbing) happens.

Env = Callable[[str], str | None]


def _no_env(name: str) -> str | None:
    return None


def _any_env(name: str) -> str | None:
    return "x"  # for checking syntax only: every variable set and non-empty


def _expand(word: str, env: Env) -> str:
    """`word` with quotes and backslashes processed and variables expanded (ProcessWord)."""
    return _Lexer(word, env).run()[0]


def _expand_words(word: str, env: Env) -> list[str]:
    """The same, then split into words on unquoted whitespace (ProcessWords, for EXPOSE)."""
    return _Lexer(word, env).run()[1]


def _check_syntax(word: str) -> None:
    """Refuse now what no environment can make valid: an open quote, a bad `${...}`."""
    _Lexer(word, _any_env).run()


class _Words:
    """Word splitting of the lexer's output: expanded text splits on whitespace, quoted and
    escaped text does not."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.buf = ""
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if not ch.isspace():
            self.add_raw(ch)
        elif self.in_word and self.buf:
            self.words.append(self.buf)
            self.buf, self.in_word = "", False

    def add_text(self, text: str) -> None:
        for ch in text:
            self.add_char(ch)

    def add_raw(self, text: str) -> None:
        self.buf += text
        self.in_word = True

    def done(self) -> list[str]:
        if self.buf:
            self.words.append(self.buf)
        return self.words


class _Lexer:
    def __init__(self, text: str, env: Env) -> None:
        self.text = text
        self.pos = 0
        self.env = env

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        ch = self.peek()
        self.pos += len(ch)
        return ch

    def run(self) -> tuple[str, list[str]]:
        try:
            return self.until("", raw_escapes=False)
        except _Invalid as exc:
            raise _Invalid(f"failed to process {self.text!r}: {exc}") from None

    def until(self, stop: str, raw_escapes: bool) -> tuple[str, list[str]]:
        """Process up to `stop` (consumed; "" for the end). `raw_escapes` keeps backslashes
        (inside ${NAME#pattern} and the like, where the pattern needs them)."""
        out: list[str] = []
        words = _Words()
        while self.pos < len(self.text):
            ch = self.peek()
            if stop and ch == stop:
                self.pos += 1
                return "".join(out), words.done()
            if ch == "$":
                text = self.dollar()
                out.append(text)
                words.add_text(text)
            elif ch == "'":
                text = self.single_quoted()
                out.append(text)
                words.add_raw(text)
            elif ch == '"':
                text = self.double_quoted(raw_escapes)
                out.append(text)
                words.add_raw(text)
            else:
                self.pos += 1
                if ch == "\\":
                    if raw_escapes:
                        words.add_raw(ch)
                        out.append(ch)
                    ch = self.take()
                    if not ch:
                        break  # a trailing backslash is dropped
                    words.add_raw(ch)
                else:
                    words.add_char(ch)
                out.append(ch)
        if stop:
            raise _Invalid(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out), words.done()

    def single_quoted(self) -> str:
        self.pos += 1
        end = self.text.find("'", self.pos)
        if end < 0:
            raise _Invalid("unexpected end of statement while looking for matching "
                           "single-quote")
        out = self.text[self.pos:end]
        self.pos = end + 1
        return out

    def double_quoted(self, raw_escapes: bool) -> str:
        self.pos += 1
        out: list[str] = []
        while True:
            ch = self.peek()
            if not ch:
                raise _Invalid("unexpected end of statement while looking for matching "
                               "double-quote")
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            self.pos += 1
            if ch == "\\":
                if raw_escapes:
                    out.append(ch)
                if not self.peek():
                    continue
                if self.peek() in '"$\\':
                    ch = self.take()
            out.append(ch)

    def name(self) -> str:
        start = self.pos
        ch = self.peek()
        if ch.isdecimal():
            while self.peek().isdecimal():
                self.pos += 1
        elif ch and ch in "@*#?-$!":  # special parameters: never set here
            self.pos += 1
        else:  # Go's unicode.IsLetter/IsDigit: Python's isalpha/isdecimal
            while (ch := self.peek()) and (ch.isalpha() or ch.isdecimal() or ch == "_"):
                self.pos += 1
        return self.text[start:self.pos]

    def dollar(self) -> str:
        self.pos += 1
        if self.peek() != "{":
            name = self.name()
            return (self.env(name) or "") if name else "$"
        self.pos += 1
        if not self.peek():
            raise _Invalid("syntax error: missing '}'")
        if self.peek() in "{}:":
            raise _Invalid("syntax error: bad substitution")
        name = self.name()
        op = self.take()
        if op == "}":
            return self.env(name) or ""
        if not op:
            raise _Invalid("syntax error: missing '}'")
        colon = op == ":"
        if colon:
            op = self.take()
            if not op:
                raise _Invalid("syntax error: missing '}'")
        modifier = (":" if colon else "") + op
        if op == "/" and not colon:
            return self.replace(name)
        if op not in "+-?#%" or (colon and op in "#%"):
            raise _Invalid(f"unsupported modifier ({modifier}) in substitution")
        word = self.word_until_brace(raw_escapes=op in "#%")
        value = self.env(name)
        empty = value is None or (colon and value == "")
        if op == "-":
            return word if empty else (value or "")
        if op == "+":
            return "" if empty else word
        if op == "?":
            if value is None:
                raise _Invalid(f"{name}: {word or 'is not allowed to be unset'}")
            if empty:
                raise _Invalid(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        greedy = word.startswith(op)
        if greedy:
            word = word[1:]
        return _trim(word, value or "", greedy, suffix=op == "%")

    def word_until_brace(self, raw_escapes: bool) -> str:
        try:
            return self.until("}", raw_escapes)[0]
        except _Invalid:
            if not self.peek():
                raise _Invalid("syntax error: missing '}'") from None
            raise

    def replace(self, name: str) -> str:
        every = self.peek() == "/"
        if every:
            self.pos += 1
        try:
            pattern = self.until("/", raw_escapes=True)[0]
        except _Invalid:
            if not self.peek():
                raise _Invalid("syntax error: missing '/' in ${}") from None
            raise
        replacement = self.word_until_brace(raw_escapes=True)
        value = self.env(name) or ""
        regex = _shell_pattern(pattern, greedy=True, anchored=False)
        if every:
            return regex.sub(lambda _m: replacement, value)
        m = regex.search(value)
        return value if m is None else value[:m.start()] + replacement + value[m.end():]


def _shell_pattern(pattern: str, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """A ${NAME#pattern}-style pattern as a regex: `*` any string (shortest unless greedy),
    `?` one character, `\\` escapes `*`, `?` and `\\` (and is dropped before `}` and `/`); no
    bracket expressions."""
    out = ["^"] if anchored else []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append(".*" if greedy else ".*?")
        elif ch == "?":
            out.append(".")
        elif ch == "\\":
            nxt = pattern[i:i + 1]
            if nxt and nxt in "}/":
                continue
            if not nxt or nxt not in "*?\\":
                raise _Invalid(f"invalid pattern ({pattern}) in substitution: "
                               f"invalid escape '\\{nxt}'")
            out.append(re.escape(nxt))
            i += 1
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out))


def _trim(pattern: str, value: str, greedy: bool, suffix: bool) -> str:
    """${NAME#pattern} (prefix) and ${NAME%pattern} (suffix, matched on the reversed strings)."""
    if suffix:
        tokens: list[str] = []
        i = 0
        while i < len(pattern):  # reverse, keeping each `\x` pair in order
            step = 2 if pattern[i] == "\\" and i + 1 < len(pattern) else 1
            tokens.append(pattern[i:i + step])
            i += step
        return _trim("".join(reversed(tokens)), value[::-1], greedy, suffix=False)[::-1]
    m = _shell_pattern(pattern, greedy, anchored=True).match(value)
    return value if m is None else value[m.end():]


# --- applying --------------------------------------------------------------------------------

def apply_changes(config: dict[str, Any], changes: Sequence[Change]) -> None:
    """Apply `changes`, in order, to the image config `config` (the whole config JSON: the
    container config is `config["config"]`, created when missing). All or nothing: on
    ChangeError (a value that is only invalid once `$VAR` is expanded) or ImageError (a field of
    the wrong type) `config` is left as it was.

    Each change sees the `Env` the ones before it left (`ENV A=1` then `ENV B=$A` gives B=1;
    within one ENV, `$A` is the value before that line). A null field counts as empty.
    """
    if not changes:
        return
    container = config.get("config")
    if container is None:
        container = {}
    elif not isinstance(container, dict):
        raise ImageError("image config: config must be an object")
    state = _State(dict(container))
    for change in changes:
        try:
            _DISPATCH[change.instruction](state, change)
        except _Invalid as exc:
            raise ChangeError(f"change {change.text!r}: {exc}") from None
    config["config"] = state.config


class _State:
    """The container config being edited, and whether a CMD was given in these changes."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.cmd_set = False

    def strings(self, key: str) -> list[str]:
        value = self.config.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ImageError(f"image config: config.{key} must be a list of strings")
        return list(value)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.config.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ImageError(f"image config: config.{key} must be an object")
        return dict(value)

    def string(self, key: str) -> str:
        value = self.config.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ImageError(f"image config: config.{key} must be a string")
        return value

    def env(self) -> Env:
        """Variable lookup in the current Env (a later duplicate wins, as in Go's map)."""
        values: dict[str, str] = {}
        for entry in self.strings("Env"):
            key, _, value = entry.partition("=")
            values[key] = value
        return values.get

    def shell_form(self, command: str) -> list[str]:
        return [*(self.strings("Shell") or DEFAULT_SHELL), command]


def _apply_env(state: _State, change: Change) -> None:
    lookup = state.env()  # the Env before this line, for every pair of it
    env = state.strings("Env")
    for raw_key, raw_value in change.pairs:
        key, value = _expand(raw_key, lookup), _expand(raw_value, lookup)
        if not key:
            raise _Invalid(f"name {raw_key!r} expands to nothing")
        entry = f"{key}={value}"
        for i, old in enumerate(env):
            if old.partition("=")[0] == key:
                env[i] = entry
                break
        else:
            env.append(entry)
    state.config["Env"] = env


def _apply_label(state: _State, change: Change) -> None:
    lookup = state.env()
    labels = state.mapping("Labels")
    for raw_key, raw_value in change.pairs:
        key = _expand(raw_key, lookup)
        if not key:
            raise _Invalid(f"name {raw_key!r} expands to nothing")
        labels[key] = _expand(raw_value, lookup)
    state.config["Labels"] = labels


def _apply_expose(state: _State, change: Change) -> None:
    lookup = state.env()
    ports = state.mapping("ExposedPorts")
    for word in change.args:
        for spec in _expand_words(word, lookup):  # EXPOSE $PORTS may give several
            for key in _port_keys(spec):
                ports[key] = {}
    state.config["ExposedPorts"] = ports


def _apply_volume(state: _State, change: Change) -> None:
    lookup = state.env()
    volumes = state.mapping("Volumes")
    for item in change.args:
        path = _expand(item, lookup)
        if not path:
            raise _Invalid(f"VOLUME {item!r} expands to nothing")
        volumes[path] = {}
    state.config["Volumes"] = volumes


def _apply_single(state: _State, change: Change) -> None:
    value = _expand(change.args[0], state.env())
    _check_single(change.instruction, value)
    if change.instruction == "USER":
        state.config["User"] = value
    elif change.instruction == "STOPSIGNAL":
        state.config["StopSignal"] = value
    else:  # WORKDIR: relative to the current one (dispatchers_unix.go normalizeWorkdir)
        if not value.startswith("/"):
            value = f"/{state.string('WorkingDir')}/{value}"
        state.config["WorkingDir"] = _clean_path(value)


def _apply_cmd(state: _State, change: Change) -> None:
    argv = list(change.args) if change.exec_form else state.shell_form(change.args[0])
    state.config["Cmd"] = argv
    state.config.pop("ArgsEscaped", None)  # dockerd sets it false on Linux (omitted)
    if change.args:
        state.cmd_set = True


def _apply_entrypoint(state: _State, change: Change) -> None:
    if change.exec_form:
        state.config["Entrypoint"] = list(change.args) or None  # ENTRYPOINT [] clears it
    else:
        state.config["Entrypoint"] = state.shell_form(change.args[0])
    state.config.pop("ArgsEscaped", None)
    if not state.cmd_set:
        # As in a Dockerfile: a new entrypoint drops the old command, unless these changes
        # gave a CMD before it (dispatchEntrypoint, cmdSet).
        state.config["Cmd"] = None


def _apply_healthcheck(state: _State, change: Change) -> None:
    health: dict[str, Any] = {"Test": list(change.args)}
    health.update(change.options)
    state.config["Healthcheck"] = {k: health[k] for k in _HEALTH_FIELDS if k in health}


def _apply_onbuild(state: _State, change: Change) -> None:
    state.config["OnBuild"] = [*state.strings("OnBuild"), change.args[0]]


_DISPATCH: dict[str, Callable[[_State, Change], None]] = {
    "CMD": _apply_cmd, "ENTRYPOINT": _apply_entrypoint, "ENV": _apply_env,
    "EXPOSE": _apply_expose, "LABEL": _apply_label, "USER": _apply_single,
    "VOLUME": _apply_volume, "WORKDIR": _apply_single, "STOPSIGNAL": _apply_single,
    "HEALTHCHECK": _apply_healthcheck, "ONBUILD": _apply_onbuild,
}

