"""The method and policy registry: complete, consistent with the code it names, and the only router of options."""

from __future__ import annotations

import inspect

import pytest

import verispec
from verispec.cli import build_parser
from verispec.registry import METHODS, POLICIES, method, policy, route_options


def test_every_record_resolves_to_what_it_names():
    for m in METHODS.values():
        assert callable(m.load()), m.name
        assert m.kind in ("speculative", "baseline", "peer")
    for p in POLICIES.values():
        cls = p.load()
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert params == set(p.options), p.name  # the record lists exactly what the constructor takes
        assert p.gamma_option in p.options


def test_options_route_without_ambiguity():
    method_opts = {o for m in METHODS.values() if m.kind != "peer" for o in m.options}  # peers take no policy
    policy_opts = {o for p in POLICIES.values() for o in p.options}
    assert not method_opts & policy_opts  # an option name means one thing, whatever the method and policy
    mine, theirs = route_options(method("nasd"), policy("egag"), {"max_n": 3, "gamma_max": 6})
    assert mine == {"max_n": 3} and theirs == {"gamma_max": 6}
    with pytest.raises(ValueError, match="unknown option.*gamma_mx.*method 'nasd' takes: max_n.*policy 'egag'"):
        route_options(method("nasd"), policy("egag"), {"gamma_mx": 6})


def test_unknown_names_and_peers_in_the_api(pair):
    with pytest.raises(ValueError, match="unknown method 'nope'; known: ar, sd"):
        verispec.generate(pair[0], [1, 2], method="nope")
    with pytest.raises(ValueError, match="unknown policy"):
        verispec.generate(pair[0], [1, 2], policy="nope")
    with pytest.raises(ValueError, match="benchmark peer"):
        verispec.generate(pair[0], [1, 2], method="hf-ar")
    with pytest.raises(ValueError, match="takes no draft-length policy"):
        verispec.generate(pair[0], [1, 2], method="beam", policy="egag")


def test_the_cli_lists_come_from_the_registry(capsys):
    parser = build_parser()
    gen = next(a for a in parser._subparsers._group_actions[0].choices["generate"]._actions if a.dest == "method")
    assert all(n in gen.help for n, m in METHODS.items() if m.kind != "peer")
    pol = next(a for a in parser._subparsers._group_actions[0].choices["generate"]._actions if a.dest == "policy")
    assert all(n in pol.help for n in POLICIES)
    from verispec.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(f"`{n}`" in out for n in (*METHODS, *POLICIES)) and "draft model" in out
