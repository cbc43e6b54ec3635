"""changes.py: parsing `--change` instructions and applying them to an image config, against
moby's rules for `docker commit --change` (and, where a dockerd can run, dockerd itself)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES
from throwaway_dockerd import Daemon, DaemonError, mounts_under, unavailable

from ocilayers.changes import (
    INSTRUCTIONS,
    apply_changes,
    parse_change,
    parse_duration,
)
from ocilayers.errors import ChangeError, ImageError, OCILayersError

# A container config as dockerd 20.10 writes it for `docker commit` of a busybox container.
BASE: dict[str, Any] = {
    "User": "", "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"],
    "Volumes": None, "WorkingDir": "/", "Entrypoint": None, "OnBuild": None, "Labels": {},
}
SEC = 1_000_000_000


def applied(changes: list[str], **base_fields: Any) -> dict[str, Any]:
    """The container config after `changes`, starting from BASE updated with `base_fields`."""
    config = {"architecture": "amd64", "os": "linux", "config": {**BASE, **base_fields}}
    apply_changes(config, [parse_change(c) for c in changes])
    out: dict[str, Any] = config["config"]
    return out


def changed(changes: list[str], **base_fields: Any) -> dict[str, Any]:
    """Only the container config fields `changes` changed (a removed field shows as `...`)."""
    before = {**BASE, **base_fields}
    after = applied(changes, **base_fields)
    diff = {k: v for k, v in after.items() if before.get(k, ...) != v}
    diff.update({k: ... for k in before if k not in after})
    return diff


# --- every instruction, both forms ----------------------------------------------------------

CASES = [
    # CMD / ENTRYPOINT
    pytest.param(['CMD ["nginx", "-g", "daemon off;"]'], {},
                 {"Cmd": ["nginx", "-g", "daemon off;"]}, id="cmd-exec"),
    pytest.param(['CMD echo "hello  world" $HOME'], {},
                 {"Cmd": ["/bin/sh", "-c", 'echo "hello  world" $HOME']}, id="cmd-shell-verbatim"),
    pytest.param(["CMD make test"], {"Shell": ["/bin/bash", "-o", "pipefail", "-c"]},
                 {"Cmd": ["/bin/bash", "-o", "pipefail", "-c", "make test"]},
                 id="cmd-shell-uses-config-shell"),
    pytest.param(["CMD []"], {}, {"Cmd": []}, id="cmd-empty-json"),
    pytest.param(['CMD ["sh"'], {}, {"Cmd": ["/bin/sh", "-c", '["sh"']},
                 id="cmd-invalid-json-is-shell-form"),
    pytest.param(["CMD [ -f /ready ] && exec app"], {},
                 {"Cmd": ["/bin/sh", "-c", "[ -f /ready ] && exec app"]},
                 id="cmd-test-bracket-is-shell-form"),
    pytest.param(['cmd ["caf\\u00e9"]'], {}, {"Cmd": ["café"]}, id="cmd-lowercase-json-escape"),
    pytest.param(["CMD -- --version"], {}, {"Cmd": ["/bin/sh", "-c", "--version"]},
                 id="cmd-double-dash-ends-flags"),
    pytest.param(['CMD ["a"]'], {"ArgsEscaped": True}, {"Cmd": ["a"], "ArgsEscaped": ...},
                 id="cmd-drops-args-escaped"),
    pytest.param(['ENTRYPOINT ["/bin/echo"]'], {},
                 {"Entrypoint": ["/bin/echo"], "Cmd": None}, id="entrypoint-exec-resets-cmd"),
    pytest.param(["ENTRYPOINT exec nginx"], {},
                 {"Entrypoint": ["/bin/sh", "-c", "exec nginx"], "Cmd": None},
                 id="entrypoint-shell"),
    pytest.param(["ENTRYPOINT []"], {"Entrypoint": ["/bin/echo"], "Cmd": ["hi"]},
                 {"Entrypoint": None, "Cmd": None}, id="entrypoint-empty-clears"),
    pytest.param(['CMD ["a"]', 'ENTRYPOINT ["b"]'], {},
                 {"Cmd": ["a"], "Entrypoint": ["b"]}, id="cmd-then-entrypoint-keeps-cmd"),
    pytest.param(['ENTRYPOINT ["b"]', 'CMD ["a"]'], {},
                 {"Cmd": ["a"], "Entrypoint": ["b"]}, id="entrypoint-then-cmd"),
    pytest.param(["CMD []", 'ENTRYPOINT ["b"]'], {},
                 {"Cmd": None, "Entrypoint": ["b"]}, id="empty-cmd-then-entrypoint-resets"),
    # ENV
    pytest.param(["ENV A=1 B=\"two words\" C='$HOME' D=a\\ b E=\"a\\\"b\" F=a\\$b"], {},
                 {"Env": [BASE["Env"][0], "A=1", "B=two words", "C=$HOME", "D=a b", 'E=a"b',
                          "F=a$b"]}, id="env-pairs-quotes-escapes"),
    pytest.param(["ENV GREETING hello   big world"], {},
                 {"Env": [BASE["Env"][0], "GREETING=hello   big world"]}, id="env-legacy-form"),
    pytest.param(["ENV A=new"], {"Env": ["PATH=/bin", "A=old", "B=x"]},
                 {"Env": ["PATH=/bin", "A=new", "B=x"]}, id="env-replaces-in-place"),
    pytest.param(["ENV PATH=$PATH:/opt/bin"], {},
                 {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin:/opt/bin"]}, id="env-expands-env"),
    pytest.param(["ENV A=two B=$A"], {"Env": ["A=one"]}, {"Env": ["A=two", "B=one"]},
                 id="env-same-line-sees-old-value"),
    pytest.param(["ENV A=two", "ENV B=${A}"], {"Env": ["A=one"]}, {"Env": ["A=two", "B=two"]},
                 id="env-next-change-sees-new-value"),
    pytest.param(["ENV A= B=b=c"], {"Env": []}, {"Env": ["A=", "B=b=c"]},
                 id="env-empty-value-and-equals-in-value"),
    pytest.param(["ENV X=${NOPE:-fallback} Y=${PATH:+set} Z=${P#/usr/} W=${P%/*} V=${P//o/0}"],
                 {"Env": ["P=/usr/local/lib"]},
                 {"Env": ["P=/usr/local/lib", "X=fallback", "Y=", "Z=local/lib",
                          "W=/usr/local", "V=/usr/l0cal/lib"]}, id="env-substitution-forms"),
    pytest.param(['ENV "K 1"=v'], {"Env": []}, {"Env": ["K 1=v"]}, id="env-quoted-name"),
    # LABEL
    pytest.param(['LABEL "com.example.a b"="x y" version=1.0'], {},
                 {"Labels": {"com.example.a b": "x y", "version": "1.0"}}, id="label-pairs"),
    pytest.param(["LABEL maintainer Jane Doe <jane@example.com>"], {},
                 {"Labels": {"maintainer": "Jane Doe <jane@example.com>"}}, id="label-legacy"),
    pytest.param(["LABEL b=3 c=4"], {"Labels": {"a": "1", "b": "2"}},
                 {"Labels": {"a": "1", "b": "3", "c": "4"}}, id="label-merges-by-key"),
    pytest.param(["LABEL built.with=$TOOL"], {"Env": ["TOOL=ocilayers"]},
                 {"Labels": {"built.with": "ocilayers"}}, id="label-expands-env"),
    # EXPOSE
    pytest.param(["EXPOSE 80 443/udp 53/SCTP"], {},
                 {"ExposedPorts": {"80/tcp": {}, "443/udp": {}, "53/sctp": {}}}, id="expose-list"),
    pytest.param(["EXPOSE 8000-8002"], {},
                 {"ExposedPorts": {"8000/tcp": {}, "8001/tcp": {}, "8002/tcp": {}}},
                 id="expose-range"),
    pytest.param(["EXPOSE 80"], {"ExposedPorts": {"22/tcp": {}}},
                 {"ExposedPorts": {"22/tcp": {}, "80/tcp": {}}}, id="expose-merges"),
    pytest.param(["EXPOSE $PORTS"], {"Env": ["PORTS=80  81/udp"]},
                 {"ExposedPorts": {"80/tcp": {}, "81/udp": {}}}, id="expose-var-splits-words"),
    pytest.param(["EXPOSE 127.0.0.1:8080:80 [::1]:9000:90"], {},
                 {"ExposedPorts": {"80/tcp": {}, "90/tcp": {}}}, id="expose-host-forms"),
    # USER, WORKDIR, STOPSIGNAL
    pytest.param(["USER 1000:1000"], {}, {"User": "1000:1000"}, id="user"),
    pytest.param(['USER "$NAME"'], {"Env": ["NAME=app"]}, {"User": "app"}, id="user-var-quoted"),
    pytest.param(["WORKDIR /srv/../app/"], {}, {"WorkingDir": "/app"}, id="workdir-absolute-clean"),
    pytest.param(["WORKDIR /srv", "WORKDIR app", "WORKDIR ../x"], {}, {"WorkingDir": "/srv/x"},
                 id="workdir-relative-joins"),
    pytest.param(["WORKDIR rel"], {"WorkingDir": None}, {"WorkingDir": "/rel"},
                 id="workdir-relative-without-current"),
    pytest.param(["WORKDIR $HOME/app"], {"Env": ["HOME=/root"]}, {"WorkingDir": "/root/app"},
                 id="workdir-var"),
    pytest.param(["STOPSIGNAL SIGQUIT"], {}, {"StopSignal": "SIGQUIT"}, id="stopsignal-name"),
    pytest.param(["STOPSIGNAL term"], {}, {"StopSignal": "term"}, id="stopsignal-kept-as-given"),
    pytest.param(["STOPSIGNAL 9"], {}, {"StopSignal": "9"}, id="stopsignal-number"),
    pytest.param(["STOPSIGNAL SIGRTMIN+3"], {}, {"StopSignal": "SIGRTMIN+3"},
                 id="stopsignal-realtime"),
    # VOLUME
    pytest.param(["VOLUME /data /cache"], {}, {"Volumes": {"/data": {}, "/cache": {}}},
                 id="volume-words"),
    pytest.param(['VOLUME ["/data dir", "/$D"]'], {"Env": ["D=x"]},
                 {"Volumes": {"/data dir": {}, "/x": {}}}, id="volume-json-expands"),
    pytest.param(["VOLUME /b"], {"Volumes": {"/a": {}}}, {"Volumes": {"/a": {}, "/b": {}}},
                 id="volume-merges"),
    # HEALTHCHECK
    pytest.param(["HEALTHCHECK --interval=30s --timeout=1m30s --start-period=5s "
                  "--start-interval=500ms --retries=3 CMD curl -f http://localhost/ || exit 1"],
                 {}, {"Healthcheck": {"Test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"],
                                      "Interval": 30 * SEC, "Timeout": 90 * SEC,
                                      "StartPeriod": 5 * SEC, "StartInterval": SEC // 2,
                                      "Retries": 3}}, id="healthcheck-shell-all-options"),
    pytest.param(['HEALTHCHECK CMD ["/bin/check", "--quick"]'], {},
                 {"Healthcheck": {"Test": ["CMD", "/bin/check", "--quick"]}},
                 id="healthcheck-exec"),
    pytest.param(["healthcheck cmd true"], {}, {"Healthcheck": {"Test": ["CMD-SHELL", "true"]}},
                 id="healthcheck-lowercase"),
    pytest.param(["HEALTHCHECK NONE"], {"Healthcheck": {"Test": ["CMD-SHELL", "true"],
                                                        "Interval": 10 * SEC}},
                 {"Healthcheck": {"Test": ["NONE"]}}, id="healthcheck-none"),
    pytest.param(["HEALTHCHECK --timeout=2s CMD x"],
                 {"Healthcheck": {"Test": ["CMD-SHELL", "y"], "Interval": 10 * SEC, "Retries": 4}},
                 {"Healthcheck": {"Test": ["CMD-SHELL", "x"], "Timeout": 2 * SEC}},
                 id="healthcheck-replaces-whole"),
    pytest.param(["HEALTHCHECK --interval=0s --retries=0 --timeout= CMD x"], {},
                 {"Healthcheck": {"Test": ["CMD-SHELL", "x"]}}, id="healthcheck-zero-omitted"),
    # ONBUILD
    pytest.param(["ONBUILD run echo $HOME"], {}, {"OnBuild": ["run echo $HOME"]},
                 id="onbuild-trigger-as-written"),
    pytest.param(["onbuild COPY . /src"], {"OnBuild": ["RUN make"]},
                 {"OnBuild": ["RUN make", "COPY . /src"]}, id="onbuild-appends"),
    pytest.param(['ONBUILD HEALTHCHECK --interval=5s CMD ["x"]'], {},
                 {"OnBuild": ['HEALTHCHECK --interval=5s CMD ["x"]']}, id="onbuild-healthcheck"),
    # the text around an instruction
    pytest.param(["ENV A=1 \\\n    B=2"], {"Env": []}, {"Env": ["A=1", "B=2"]},
                 id="continuation-line"),
    pytest.param(["# the greeting\nENV A=1\n"], {"Env": []}, {"Env": ["A=1"]},
                 id="comment-and-blank-lines"),
    pytest.param(["   ENV A=1   "], {"Env": []}, {"Env": ["A=1"]}, id="surrounding-space"),
]


@pytest.mark.parametrize(("changes", "base", "expected"), CASES)
def test_apply(changes: list[str], base: dict[str, Any], expected: dict[str, Any]) -> None:
    assert changed(changes, **base) == expected


def test_facts_env_and_cmd() -> None:
    """FACTS.md: dockerd's `--change 'ENV FOO=bar' --change 'CMD ["sh"]'` added FOO=bar to
    config.Env and replaced config.Cmd; nothing else of the config changed."""
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                                                                 "diff_ids": []},
              "config": copy.deepcopy(BASE)}
    before = copy.deepcopy(config)
    apply_changes(config, [parse_change("ENV FOO=bar"), parse_change('CMD ["sh"]')])
    assert config["config"]["Env"] == [*BASE["Env"], "FOO=bar"]
    assert config["config"]["Cmd"] == ["sh"]
    config["config"].update(Env=BASE["Env"], Cmd=BASE["Cmd"])
    assert config == before


def test_change_record() -> None:
    change = parse_change("  env  A=1 \\\n B=2  ")
    assert (change.instruction, change.text, str(change)) == ("ENV", "env  A=1  B=2",
                                                              "env  A=1  B=2")
    assert change.pairs == (("A", "1"), ("B", "2"))
    assert parse_change('CMD ["a", "b"]').args == ("a", "b")
    assert parse_change('CMD ["a", "b"]').exec_form
    assert not parse_change("CMD a b").exec_form


# --- null and missing fields, all-or-nothing ------------------------------------------------

NULLS = {k: None for k in ("Env", "Labels", "ExposedPorts", "Volumes", "OnBuild", "Cmd",
                           "Entrypoint", "Shell", "WorkingDir", "Healthcheck", "User")}


@pytest.mark.parametrize(("change", "expected"), [
    pytest.param("ENV A=$NOPE-1", {"Env": ["A=-1"]}, id="env"),
    pytest.param("LABEL a=b", {"Labels": {"a": "b"}}, id="labels"),
    pytest.param("EXPOSE 80", {"ExposedPorts": {"80/tcp": {}}}, id="exposed-ports"),
    pytest.param("VOLUME /v", {"Volumes": {"/v": {}}}, id="volumes"),
    pytest.param("ONBUILD RUN x", {"OnBuild": ["RUN x"]}, id="onbuild"),
    pytest.param("CMD x", {"Cmd": ["/bin/sh", "-c", "x"]}, id="cmd-with-null-shell"),
    pytest.param("WORKDIR w", {"WorkingDir": "/w"}, id="workdir"),
], )
def test_null_fields_count_as_empty(change: str, expected: dict[str, Any]) -> None:
    config: dict[str, Any] = {"config": dict(NULLS)}
    apply_changes(config, [parse_change(change)])
    assert config["config"] == {**NULLS, **expected}


@pytest.mark.parametrize("config", [
    pytest.param({"os": "linux"}, id="missing"),
    pytest.param({"os": "linux", "config": None}, id="null"),
])
def test_container_config_created(config: dict[str, Any]) -> None:
    apply_changes(config, [parse_change("USER app")])
    assert config == {"os": "linux", "config": {"User": "app"}}


def test_no_changes_touch_nothing() -> None:
    config: dict[str, Any] = {"os": "linux"}
    apply_changes(config, [])
    assert config == {"os": "linux"}


def test_all_or_nothing() -> None:
    """A change that fails once expanded leaves the config (and its lists) as they were."""
    config: dict[str, Any] = {"config": {"Env": ["P=http"], "Labels": {"a": "1"}}}
    before = copy.deepcopy(config)
    changes = [parse_change(c) for c in ("ENV A=1", "LABEL b=2", "EXPOSE $P")]
    with pytest.raises(ChangeError, match="invalid port 'http'"):
        apply_changes(config, changes)
    assert config == before


def test_input_lists_not_shared() -> None:
    env = ["A=1"]
    config: dict[str, Any] = {"config": {"Env": env}}
    apply_changes(config, [parse_change("ENV B=2")])
    assert env == ["A=1"]
    assert config["config"]["Env"] == ["A=1", "B=2"]


@pytest.mark.parametrize(("container", "change", "field"), [
    pytest.param({"Env": "A=1"}, "ENV B=2", "config.Env", id="env-string"),
    pytest.param({"Env": ["A=1", 2]}, "ENV B=2", "config.Env", id="env-non-string"),
    pytest.param({"Labels": []}, "LABEL a=b", "config.Labels", id="labels-list"),
    pytest.param({"Shell": "/bin/sh"}, "CMD x", "config.Shell", id="shell-string"),
    pytest.param({"WorkingDir": 1}, "WORKDIR x", "config.WorkingDir", id="workdir-int"),
    pytest.param([], "USER x", "config must be an object", id="config-list"),
])
def test_malformed_config(container: Any, change: str, field: str) -> None:
    config = {"config": container}
    with pytest.raises(ImageError, match=field):
        apply_changes(config, [parse_change(change)])
    assert config == {"config": container}


# --- errors -----------------------------------------------------------------------------------

def test_unknown_instruction_names_the_allowed_ones() -> None:
    with pytest.raises(ChangeError) as info:
        parse_change("RUN apt-get update")
    assert str(info.value) == (
        "unknown change instruction 'RUN': allowed are CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, "
        "USER, VOLUME, WORKDIR, STOPSIGNAL, HEALTHCHECK, ONBUILD")
    assert INSTRUCTIONS[0] == "CMD" and len(INSTRUCTIONS) == 11


def test_change_error_kinds() -> None:
    assert issubclass(ChangeError, OCILayersError)
    assert issubclass(ChangeError, ValueError)


PARSE_ERRORS = [
    # not an instruction we take
    *[pytest.param(f"{kw} x", f"unknown change instruction '{kw}'", id=f"unknown-{kw.lower()}")
      for kw in ("FROM", "MAINTAINER", "SHELL", "ARG", "ADD", "COPY", "run")],
    pytest.param("", "empty change", id="empty"),
    pytest.param("   \n ", "empty change", id="blank"),
    pytest.param("# just a comment", "empty change", id="comment-only"),
    pytest.param("ENV A=1\nCMD x", "holds 2 instructions", id="two-instructions"),
    # JSON arrays of non-strings
    pytest.param('CMD ["sh", 1]', "arrays must be comprised of strings only", id="json-number"),
    pytest.param("ENTRYPOINT [null]", "strings only", id="json-null"),
    pytest.param('VOLUME ["/a", ["/b"]]', "strings only", id="json-nested"),
    pytest.param('HEALTHCHECK CMD ["x", {}]', "strings only", id="json-object"),
    # missing arguments
    *[pytest.param(kw, "requires", id=f"bare-{kw.lower()}")
      for kw in INSTRUCTIONS],
    pytest.param("VOLUME []", "requires at least one argument", id="volume-empty-json"),
    pytest.param('VOLUME [""]', "can not be an empty string", id="volume-empty-string"),
    # ENV and LABEL syntax
    pytest.param("ENV A", "ENV must have two arguments", id="env-legacy-one-word"),
    pytest.param("ENV A=1 B", "can't find = in 'B'", id="env-word-without-equals"),
    pytest.param("ENV =1", "names can not be blank", id="env-blank-name"),
    pytest.param("LABEL =x", "names can not be blank", id="label-blank-name"),
    pytest.param('ENV A="x', "matching double-quote", id="open-double-quote"),
    pytest.param("LABEL a='x", "matching single-quote", id="open-single-quote"),
    pytest.param("ENV A=${}", "bad substitution", id="empty-substitution"),
    pytest.param("ENV A=${B", "missing '}'", id="open-substitution"),
    pytest.param("ENV A=${B:#x}", "unsupported modifier (:#)", id="bad-modifier"),
    pytest.param("ENV A=${B#\\x}", "invalid escape", id="bad-pattern-escape"),
    # options where there are none
    pytest.param("CMD --foo x", "unknown flag: --foo", id="cmd-flag"),
    pytest.param("ENV --x=1 A=1", "unknown flag: --x", id="env-flag"),
    # HEALTHCHECK
    pytest.param("HEALTHCHECK --interval=10 CMD x", "missing unit in duration '10'",
                 id="duration-missing-unit"),
    pytest.param("HEALTHCHECK --interval=5x CMD x", "unknown unit 'x'", id="duration-bad-unit"),
    pytest.param("HEALTHCHECK --interval=abc CMD x", "invalid duration", id="duration-garbage"),
    pytest.param("HEALTHCHECK --timeout=500us CMD x", "at least 1ms", id="duration-below-1ms"),
    pytest.param("HEALTHCHECK --interval=-5s CMD x", "at least 1ms", id="duration-negative"),
    pytest.param("HEALTHCHECK --retries=-1 CMD x", "cannot be negative", id="retries-negative"),
    pytest.param("HEALTHCHECK --retries=two CMD x", "must be an integer", id="retries-word"),
    pytest.param("HEALTHCHECK --interval 10s CMD x", "missing a value on flag: --interval",
                 id="option-without-equals"),
    pytest.param("HEALTHCHECK --interval=1s --interval=2s CMD x", "duplicate flag",
                 id="option-twice"),
    pytest.param("HEALTHCHECK --foo=1 CMD x", "unknown flag: --foo", id="option-unknown"),
    pytest.param("HEALTHCHECK RUN x", "unknown type 'RUN' in HEALTHCHECK", id="type-unknown"),
    pytest.param("HEALTHCHECK NONE x", "takes no arguments", id="none-with-argument"),
    pytest.param("HEALTHCHECK --interval=1s NONE", "takes no options", id="none-with-option"),
    pytest.param("HEALTHCHECK CMD", "missing command", id="cmd-without-command"),
    pytest.param("HEALTHCHECK CMD []", "missing command", id="cmd-empty-json"),
    # EXPOSE
    pytest.param("EXPOSE 70000", "invalid port '70000'", id="port-too-big"),
    pytest.param("EXPOSE 80/icmp", "invalid protocol 'icmp'", id="port-protocol"),
    pytest.param("EXPOSE http", "invalid port 'http'", id="port-name"),
    pytest.param("EXPOSE 8002-8000", "invalid port '8002-8000'", id="port-range-reversed"),
    pytest.param("EXPOSE /tcp", "no port specified", id="port-missing"),
    pytest.param("EXPOSE +80", "invalid port", id="port-signed"),
    pytest.param("EXPOSE 1.2.3:80:80", "invalid IP address", id="port-bad-ip"),
    pytest.param("EXPOSE 8000-8002:80-81", "invalid ranges", id="port-range-mismatch"),
    # STOPSIGNAL, WORKDIR
    pytest.param("STOPSIGNAL SIGFOO", "invalid signal 'SIGFOO'", id="signal-unknown"),
    pytest.param("STOPSIGNAL 0", "invalid signal '0'", id="signal-zero"),
    pytest.param("STOPSIGNAL 65", "invalid signal '65'", id="signal-too-big"),
    pytest.param("WORKDIR ''", "WORKDIR cannot be empty", id="workdir-empty"),
    # ONBUILD
    pytest.param("ONBUILD ONBUILD RUN x", "chaining ONBUILD", id="onbuild-onbuild"),
    pytest.param("ONBUILD FROM alpine", "FROM isn't allowed as an ONBUILD trigger",
                 id="onbuild-from"),
    pytest.param("ONBUILD maintainer me", "MAINTAINER isn't allowed", id="onbuild-maintainer"),
    pytest.param("ONBUILD BOGUS x", "unknown ONBUILD trigger instruction 'BOGUS'",
                 id="onbuild-unknown-trigger"),
    pytest.param('ONBUILD CMD ["a", 1]', "trigger CMD: when using JSON array", id="onbuild-json"),
    pytest.param('ONBUILD RUN ["a", 1]', "strings only", id="onbuild-run-json"),
    pytest.param("ONBUILD ENV A", "trigger ENV: ENV must have two arguments",
                 id="onbuild-bad-env"),
]


@pytest.mark.parametrize(("text", "message"), PARSE_ERRORS)
def test_parse_error(text: str, message: str) -> None:
    with pytest.raises(ChangeError) as info:
        parse_change(text)
    assert message in str(info.value)


@pytest.mark.parametrize(("change", "env", "message"), [
    pytest.param("EXPOSE $P", ["P=http"], "invalid port 'http'", id="expose"),
    pytest.param("STOPSIGNAL $S", ["S=NOPE"], "invalid signal 'NOPE'", id="stopsignal"),
    pytest.param("WORKDIR $UNSET", [], "WORKDIR cannot be empty", id="workdir"),
    pytest.param('ENV A="${NEED:?set NEED first}"', [], "NEED: set NEED first",
                 id="required"),
    pytest.param("ENV A=${NEED:?}", ["NEED="], "NEED: is not allowed to be empty",
                 id="required-not-empty"),
    pytest.param("ENV $UNSET=1", [], "expands to nothing", id="env-name"),
    pytest.param("LABEL ${UNSET}=1", [], "expands to nothing", id="label-name"),
    pytest.param("VOLUME $UNSET", [], "expands to nothing", id="volume"),
])
def test_error_once_expanded(change: str, env: list[str], message: str) -> None:
    """Valid as written, invalid with this Env: parse_change accepts, apply_changes refuses."""
    parsed = parse_change(change)
    with pytest.raises(ChangeError) as info:
        apply_changes({"config": {"Env": env}}, [parsed])
    assert message in str(info.value)
    assert repr(change) in str(info.value)


# --- words: what a value becomes ------------------------------------------------------------

ENV = ["HOME=/root", "EMPTY=", "P=/usr/local/lib", "SP=a  b"]


@pytest.mark.parametrize(("word", "value"), [
    pytest.param("plain", "plain", id="plain"),
    pytest.param("'$HOME \\n'", "$HOME \\n", id="single-quotes-literal"),
    pytest.param('"$HOME \\n \\$ \\" \\\\"', '/root \\n $ " \\', id="double-quotes"),
    pytest.param("a\\ b\\'c", "a b'c", id="backslash-outside-quotes"),
    pytest.param("end\\", "end", id="trailing-backslash-dropped"),
    pytest.param('"$HOME/x ${HOME}y $"', "/root/x /rooty $", id="dollar-forms"),
    pytest.param("$NOPE|${NOPE}|$1|$@", "|||", id="unset-is-empty"),
    pytest.param("${EMPTY:-d}|${EMPTY-d}|${NOPE-d}", "d||d", id="default"),
    pytest.param("${EMPTY:+a}|${EMPTY+a}|${NOPE+a}", "|a|", id="alternative"),
    pytest.param("${P#*/}|${P##*/}|${P%/*}|${P%%/*}", "usr/local/lib|lib|/usr/local|",
                 id="trim-prefix-suffix"),
    pytest.param("${P/l/L}|${P//l/L}|${P/#/x}", "/usr/Local/lib|/usr/LocaL/Lib|/usr/local/lib",
                 id="replace"),
    pytest.param('"${SP}"|$SP', "a  b|a  b", id="spaces-kept-in-one-word"),
])
def test_word_values(word: str, value: str) -> None:
    assert applied([f"LABEL v={word}"], Env=ENV)["Labels"] == {"v": value}


@pytest.mark.parametrize(("text", "ns"), [
    pytest.param("0", 0, id="zero"),
    pytest.param("1ns", 1, id="ns"),
    pytest.param("1us", 1_000, id="us"),
    pytest.param("1\u00b5s", 1_000, id="micro-sign"),
    pytest.param("1\u03bcs", 1_000, id="greek-mu"),
    pytest.param("300ms", 300_000_000, id="ms"),
    pytest.param("1.5s", 1_500_000_000, id="fraction"),
    pytest.param(".5s", 500_000_000, id="leading-dot"),
    pytest.param("1.s", SEC, id="trailing-dot"),
    pytest.param("1m30s", 90 * SEC, id="minutes-seconds"),
    pytest.param("2h45m", (2 * 3600 + 45 * 60) * SEC, id="hours-minutes"),
    pytest.param("+5s", 5 * SEC, id="plus"),
    pytest.param("-1.5h", -5400 * SEC, id="negative"),
    pytest.param("9223372036854775807ns", (1 << 63) - 1, id="max"),
])
def test_parse_duration(text: str, ns: int) -> None:
    assert parse_duration(text) == ns


@pytest.mark.parametrize("text", [
    pytest.param("", id="empty"),
    pytest.param("-", id="sign-only"),
    pytest.param("10", id="no-unit"),
    pytest.param("s", id="unit-only"),
    pytest.param(".s", id="dot-unit"),
    pytest.param("1x", id="unknown-unit"),
    pytest.param("1.5.5s", id="two-dots"),
    pytest.param("1 s", id="space"),
    pytest.param("9223372036854775808ns", id="overflow"),
    pytest.param("3000000h", id="overflow-hours"),
])
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# --- against a real dockerd (docker commit --change), where one can run here ----------------
#
# Base containers are made with `docker create` from fixtures/docker-save.tar, committed once
# to read their config, then committed with the changes; the config dockerd stores
# (imagedb/content) is compared with apply_changes on the base's config.

# name -> (`docker create` options, command)
DOCKER_BASES: dict[str, tuple[list[str], list[str]]] = {
    "plain": ([], []),
    "ep": (["--entrypoint", "/bin/echo"], ["hi"]),
    "hc": (["--health-cmd", "true", "--health-interval", "10s", "--health-retries", "4"], []),
    "env": (["-e", "A=one", "-e", "P=/x"], []),
}

SAME_AS_DOCKERD = [
    pytest.param("plain", ["ENV FOO=bar", 'CMD ["sh"]'], id="facts-env-cmd"),
    pytest.param("plain", ['ENTRYPOINT ["/bin/echo"]'], id="entrypoint-resets-cmd"),
    pytest.param("plain", ['CMD ["a"]', 'ENTRYPOINT ["b"]'], id="cmd-then-entrypoint"),
    pytest.param("plain", ["ENTRYPOINT echo hi"], id="entrypoint-shell"),
    pytest.param("ep", ["CMD []"], id="empty-cmd-with-entrypoint"),
    pytest.param("plain", ['CMD ["sh"'], id="invalid-json-is-shell-form"),
    pytest.param("plain", ["onbuild  RUN   echo $HOME  "], id="onbuild-as-written"),
    pytest.param("env", ["ENV B=$P:x", "ENV A=1 C=$A", "ENV D ${A}  and  $B"], id="env-expansion"),
    pytest.param("env", ["ENV Q=\"x y\" R='$z' S=a\\ b T=\"a\\\"b\" U=a\\$b"], id="env-quoting"),
    pytest.param("env", ["LABEL a=$P b=\"x y\" 'c d'=e"], id="label"),
    pytest.param("plain", ["EXPOSE 8000-8002 80/UDP 53/sctp", "EXPOSE 127.0.0.1:80:81"],
                 id="expose"),
    pytest.param("plain", ["WORKDIR rel", "WORKDIR ./x/../y"], id="workdir-relative"),
    pytest.param("plain", ["USER foo bar"], id="user-with-space"),
    pytest.param("plain", ["VOLUME /a /b", 'VOLUME ["/c", "/d e"]'], id="volume"),
    pytest.param("plain", ["HEALTHCHECK --timeout=1.5s --retries=3 --start-period=2s "
                           "CMD curl -f http://x/ || exit 1"], id="healthcheck"),
    pytest.param("plain", ["ENV A=1 \\\n B=2"], id="continuation"),
]

BOTH_REFUSE = [
    pytest.param('CMD ["sh", 1]', id="json-non-string"),
    pytest.param("EXPOSE 80/icmp", id="protocol"),
    pytest.param("HEALTHCHECK --interval=10 CMD x", id="duration"),
    pytest.param("ONBUILD ONBUILD RUN x", id="onbuild-onbuild"),
    pytest.param("ENV A=1 B", id="env-syntax"),
    pytest.param("RUN x", id="run"),
]

# Where ocilayers deliberately differs from dockerd 20.10's commit (changes.py's docstring):
# (base, changes, field, dockerd's value, ocilayers' value).
DIFFERENT_FROM_DOCKERD_20_10 = [
    pytest.param("ep", ["ENTRYPOINT []"], "Entrypoint", ["/bin/echo"], None,
                 id="entrypoint-empty-restored-by-merge"),
    pytest.param("ep", ["ENTRYPOINT []"], "Cmd", ["hi"], None, id="cmd-restored-by-merge"),
    pytest.param("plain", ["CMD []"], "Cmd", ["/bin/sh"], [], id="empty-cmd-restored-by-merge"),
    pytest.param("hc", ["HEALTHCHECK NONE"], "Healthcheck",
                 {"Test": ["NONE"], "Interval": 10 * SEC, "Retries": 4}, {"Test": ["NONE"]},
                 id="healthcheck-inherits-by-merge"),
    pytest.param("plain", ["WORKDIR /a/../b/"], "WorkingDir", "/a/../b/", "/b",
                 id="workdir-cleaned-since-moby-28"),
]


@dataclass
class Dockerd:
    daemon: Daemon
    version: str
    bases: dict[str, dict[str, Any]]  # base container name -> its committed config


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    d = Daemon(Path(tempfile.mkdtemp(prefix="/tmp/ch-")))
    try:
        try:
            d.start()
        except (DaemonError, OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"dockerd could not be started: {exc}")
        d.docker("load", "-i", str(FIXTURES / "docker-save.tar"))
        bases = {}
        for name, (options, command) in DOCKER_BASES.items():
            d.docker("create", "--name", name, *options, "committed:latest", *command)
            bases[name] = _docker_commit(d, name, [])
        version = d.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
        yield Dockerd(d, version, bases)
    finally:
        problems = d.stop()
        if not mounts_under(d.base):
            shutil.rmtree(d.base, ignore_errors=True)
    assert not problems, problems


def _docker_commit(d: Daemon, container: str, changes: list[str]) -> dict[str, Any]:
    """The container config dockerd stores for `docker commit --change ...` (raises
    AssertionError with dockerd's message when it refuses)."""
    argv = ["commit"]
    for change in changes:
        argv += ["--change", change]
    image_id = d.docker(*argv, container).stdout.strip()
    raw = d.data_root / "image/overlay2/imagedb/content/sha256" / image_id.split(":")[1]
    config: dict[str, Any] = json.loads(raw.read_bytes())["config"]
    return config


def _ours(base: dict[str, Any], changes: list[str]) -> dict[str, Any]:
    config = {"config": copy.deepcopy(base)}
    apply_changes(config, [parse_change(c) for c in changes])
    out: dict[str, Any] = config["config"]
    return out


@pytest.mark.parametrize(("base", "changes"), SAME_AS_DOCKERD)
def test_same_as_dockerd(dockerd: Dockerd, base: str, changes: list[str]) -> None:
    expected = _docker_commit(dockerd.daemon, base, changes)
    assert _ours(dockerd.bases[base], changes) == expected


@pytest.mark.parametrize("change", BOTH_REFUSE)
def test_both_refuse(dockerd: Dockerd, change: str) -> None:
    with pytest.raises(ChangeError):
        parse_change(change)
    with pytest.raises(AssertionError, match="Error response from daemon"):
        _docker_commit(dockerd.daemon, "plain", [change])


@pytest.mark.parametrize(("base", "changes", "field", "docker", "ours"),
                         DIFFERENT_FROM_DOCKERD_20_10)
def test_known_differences(dockerd: Dockerd, base: str, changes: list[str], field: str,
                           docker: Any, ours: Any) -> None:
    if not dockerd.version.startswith("20.10."):
        pytest.skip(f"measured on dockerd 20.10, this is {dockerd.version}")
    assert _docker_commit(dockerd.daemon, base, changes)[field] == docker
    assert _ours(dockerd.bases[base], changes)[field] == ours
