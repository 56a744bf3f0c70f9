"""Machine specs and machine files: parse_machine, format_machine, merge_machines,
load_machine_file (distexec._machinefile).

The first table holds Julia's own ``parse_machine`` tests (``test/distributed_exec.jl``),
translated: Julia returns ``(host, port)``, distexec all five parts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distexec._machinefile import (
    FILE_FORM,
    SPEC_FORM,
    Machine,
    format_machine,
    load_machine_file,
    merge_machines,
    parse_machine,
)

# --- strategies (local: they serve this module only) -----------------------------------

_name_chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


def names() -> st.SearchStrategy[str]:
    """Host names / users: a letter, digit or '_' first, then the allowed characters."""
    first = st.sampled_from("abcxyzABC019_")
    rest = st.text(alphabet=_name_chars, max_size=12)
    return st.builds(lambda a, b: a + b, first, rest)


def hosts() -> st.SearchStrategy[str]:
    return (
        names()
        | st.ip_addresses(v=4).map(str)
        | st.ip_addresses(v=6).map(str)
        | st.sampled_from(["localhost", "::1", "fe80::1%eth0"])
    )


def ports() -> st.SearchStrategy[int | None]:
    return st.none() | st.integers(min_value=1, max_value=65535)


def machine_parts() -> st.SearchStrategy[tuple[object, ...]]:
    """``(user, host, port, bind_addr, bind_port)``; a bind port only with a bind address."""
    bind = st.none().map(lambda _: (None, None)) | st.tuples(hosts(), ports())
    return st.builds(
        lambda user, host, port, b: (user, host, port, b[0], b[1]),
        st.none() | names(),
        hosts(),
        ports(),
        bind,
    )


counts = st.integers(min_value=0, max_value=50) | st.just("auto")


# --- parse_machine ----------------------------------------------------------------------

valid_specs = [
    # Julia's cases
    ("127.0.0.1", (None, "127.0.0.1", None, None, None)),
    ("127.0.0.1:80", (None, "127.0.0.1", 80, None, None)),
    ("[2001:db8::1]", (None, "2001:db8::1", None, None, None)),
    ("[2001:db8::1]:443", (None, "2001:db8::1", 443, None, None)),
    ("127.0.0.1:90", (None, "127.0.0.1", 90, None, None)),
    ("127.0.0.1:1", (None, "127.0.0.1", 1, None, None)),
    ("127.0.0.1:65535", (None, "127.0.0.1", 65535, None, None)),
    # users, bind addresses, whitespace, IPv6 with a user
    ("node1", (None, "node1", None, None, None)),
    ("alice@node1", ("alice", "node1", None, None, None)),
    ("alice@node1:2222", ("alice", "node1", 2222, None, None)),
    ("alice@[::1]:22", ("alice", "::1", 22, None, None)),
    ("node1 10.0.0.5", (None, "node1", None, "10.0.0.5", None)),
    ("node1 10.0.0.5:9000", (None, "node1", None, "10.0.0.5", 9000)),
    ("  u@h:1   [fd00::2]:9000  ", ("u", "h", 1, "fd00::2", 9000)),
    ("h\t0.0.0.0", (None, "h", None, "0.0.0.0", None)),
    ("[127.0.0.1]:22", (None, "127.0.0.1", 22, None, None)),  # known_hosts style brackets
    ("svc$@h", ("svc$", "h", None, None, None)),  # Samba machine account
    ("my_host.example-1.org", (None, "my_host.example-1.org", None, None, None)),
]


@pytest.mark.parametrize(("spec", "expected"), valid_specs)
def test_parse_machine(spec: str, expected: tuple[object, ...]) -> None:
    assert parse_machine(spec) == expected


invalid_specs = [
    # Julia's cases
    ("127.0.0.1:-1", "is not a number"),
    ("127.0.0.1:0", "0 is not in 1..65535"),
    ("127.0.0.1:65536", "65536 is not in 1..65535"),
    # ours
    ("", "it is empty"),
    ("   ", "it is empty"),
    ("h:", "is not a number"),
    ("h:22:33", "in brackets"),
    ("::1", "in brackets"),
    ("2001:db8::1:22", "in brackets"),
    ("[::1", "without ']'"),
    ("[::1]22", "unexpected '22' after ']'"),
    ("[::zz]", "is not an IPv6 address"),
    ("[]", "empty host"),
    ("@h", "user ''"),
    ("a@b@h", "user 'a@b'"),
    ("u@", "empty host"),
    ("-oProxyCommand=evil", "host '-oProxyCommand=evil' must start with"),
    ("-l root@h", "host '-l' must start with"),
    ("h;rm -rf", "host 'h;rm'"),
    ("h$(x)", "host 'h$(x)'"),
    ("h `x`", "bind address '`x`'"),
    ("h u@10.0.0.1", "cannot have a user"),
    ("h 10.0.0.1:0", "bind address port 0"),
    ("a b c", "3 words"),
    ("ho\u0301st", "must start with"),  # non-ASCII
    ("h:\uff12\uff12", "is not a number"),  # full-width digits are not a port
]


@pytest.mark.parametrize(("spec", "fragment"), invalid_specs)
def test_parse_machine_rejects(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_machine(spec)
    message = str(info.value)
    assert fragment in message
    assert repr(spec) in message  # names the spec ...
    assert SPEC_FORM in message  # ... and the form it should have


@pytest.mark.parametrize("spec", [None, 3, b"host", ("host", 1)])
def test_parse_machine_wants_a_string(spec: object) -> None:
    with pytest.raises(TypeError, match="must be a string"):
        parse_machine(spec)  # type: ignore[arg-type]


@given(machine_parts())
def test_format_then_parse_round_trips(parts: tuple[object, ...]) -> None:
    spec = format_machine(*parts)  # type: ignore[arg-type]
    assert parse_machine(spec) == parts
    assert parse_machine(f"  {spec.replace(' ', '   ')}\t") == parts


@given(st.text(alphabet="ab1:[]@ .-_$%", max_size=20))
def test_any_text_parses_to_a_canonical_spec_or_fails_cleanly(text: str) -> None:
    try:
        parts = parse_machine(text)
    except ValueError as exc:
        assert repr(text) in str(exc)
        return
    assert parse_machine(format_machine(*parts)) == parts


def test_machine_destination() -> None:
    [with_user, ipv6] = merge_machines(["u@h:22", "[::1]"])
    assert with_user.destination == "u@h"
    assert ipv6.destination == "::1"  # ssh takes IPv6 without brackets; the port goes in -p
    assert ipv6.spec == "[::1]"


# --- merge_machines ---------------------------------------------------------------------

merge_cases = [
    (["a"], [("a", 1)]),
    (["a", "a", ("a", 3)], [("a", 5)]),
    (["a", "b", "a"], [("a", 2), ("b", 1)]),  # order of first appearance
    ([("a", 2), ("a", "auto"), ("a", 1)], [("a", "auto")]),  # "auto" wins
    (["a", "a ", " a"], [("a", 3)]),  # the same machine, written differently
    (["[127.0.0.1]:22", "127.0.0.1:22"], [("127.0.0.1:22", 2)]),
    (["a", "a:22", "u@a"], [("a", 1), ("a:22", 1), ("u@a", 1)]),  # different machines
    ([("a", 0), "b"], [("b", 1)]),  # nothing to start on a
    ([], []),
    (("a", "b"), [("a", 1), ("b", 1)]),  # any iterable
]


@pytest.mark.parametrize(("machines", "expected"), merge_cases)
def test_merge_machines(machines: list[object], expected: list[tuple[str, object]]) -> None:
    assert [(m.spec, m.count) for m in merge_machines(machines)] == expected


merge_errors = [
    ("host", TypeError, "not a single string"),
    ([("a", 1, 2)], TypeError, "spec string or a \\(spec, count\\) pair"),
    ([["a", 1]], TypeError, "spec string or a \\(spec, count\\) pair"),
    ([3], TypeError, "spec string or a \\(spec, count\\) pair"),
    ([("a", -1)], ValueError, "must not be negative"),
    ([("a", 1.5)], TypeError, "must be an int or 'auto'"),
    ([("a", True)], TypeError, "must be an int or 'auto'"),
    ([("a", "all")], TypeError, "must be an int or 'auto'"),
    ([(3, 1)], TypeError, "must be a string"),
    (["a:99999"], ValueError, "invalid machine spec 'a:99999'"),
    ([("h 10.0.0.1:65535", 2)], ValueError, "2 workers from port 65535 go past 65535"),
]


@pytest.mark.parametrize(("machines", "exc", "match"), merge_errors)
def test_merge_machines_rejects(machines: object, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        merge_machines(machines)  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.sampled_from(["a", "u@a", "b:22", "[::1]"]), counts), max_size=12))
def test_merge_adds_counts_per_machine(entries: list[tuple[str, int | str]]) -> None:
    expected: dict[str, int | str] = {}
    for spec, count in entries:
        old = expected.get(spec, 0)
        expected[spec] = "auto" if "auto" in (old, count) else int(old) + int(count)
    merged = merge_machines(entries)
    assert {m.spec: m.count for m in merged} == {k: v for k, v in expected.items() if v != 0}
    assert [m.spec for m in merged] == [k for k, v in expected.items() if v != 0]
    assert all(isinstance(m, Machine) for m in merged)


# --- load_machine_file ------------------------------------------------------------------

MACHINE_FILE = """\
# the cluster
node1
2*alice@node2:2222          # two workers
auto*node3 10.0.0.3:9000

  3 * [fd00::4]:22 [fd00::4]
   # indented comment
0*spare
"""


def test_load_machine_file(tmp_path: Path) -> None:
    path = tmp_path / "machines"
    path.write_text(MACHINE_FILE)
    assert load_machine_file(path) == [
        ("node1", 1),
        ("alice@node2:2222", 2),
        ("node3 10.0.0.3:9000", "auto"),
        ("[fd00::4]:22 [fd00::4]", 3),
        ("spare", 0),
    ]
    assert load_machine_file(str(path)) == load_machine_file(path)
    assert [m.spec for m in merge_machines(load_machine_file(path))] == [
        "node1",
        "alice@node2:2222",
        "node3 10.0.0.3:9000",
        "[fd00::4]:22 [fd00::4]",
    ]


def test_empty_machine_file(tmp_path: Path) -> None:
    path = tmp_path / "machines"
    path.write_text("\n# nothing\n   \n")
    assert load_machine_file(path) == []


bad_lines = [
    ("x*node1", "invalid count 'x'"),
    ("-1*node1", "invalid count '-1'"),
    ("2*", "it is empty"),
    ("2*3*node1", "'3*node1'"),
    ("node1:0", "is not in 1..65535"),
    ("a b c", "3 words"),
    ("2*::1", "in brackets"),
]


@pytest.mark.parametrize(("line", "fragment"), bad_lines)
def test_load_machine_file_names_the_bad_line(tmp_path: Path, line: str, fragment: str) -> None:
    path = tmp_path / "machines"
    path.write_text(f"# header\nnode0\n\n{line}\nnode9\n")
    with pytest.raises(ValueError) as info:
        load_machine_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ")
    assert fragment in message
    assert FILE_FORM in message


def test_load_machine_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_machine_file(tmp_path / "nope")


@given(st.lists(st.tuples(machine_parts(), counts), max_size=8), st.booleans())
def test_machine_file_round_trips(
    tmp_path_factory: pytest.TempPathFactory,
    entries: list[tuple[tuple[object, ...], int | str]],
    explicit_one: bool,
) -> None:
    lines = []
    expected = []
    for parts, count in entries:
        spec = format_machine(*parts)  # type: ignore[arg-type]
        prefix = "" if count == 1 and not explicit_one else f"{count}*"
        lines.append(f"{prefix}{spec}  # comment")
        expected.append((spec, count))
    path = tmp_path_factory.mktemp("mf") / "machines"
    path.write_text("\n".join(lines) + "\n")
    assert load_machine_file(path) == expected
