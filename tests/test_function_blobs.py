"""A pool pickles a plain function once and reuses the pickle until
something the function refers to is rebound; a function that refers to
something that can change in place is pickled at every call, as before."""

from __future__ import annotations

import pytest

from distripool import Pool, _functions


@pytest.fixture(scope="module")
def pool():
    with Pool(1) as p:
        yield p


def _made(source: str, **globals_):
    """A function made from ``source`` in a namespace of its own: not
    importable, so it travels by value."""
    namespace = dict(globals_)
    exec(source, namespace)
    return namespace["f"], namespace


def test_a_rebound_global_is_seen_at_the_next_call(pool):
    f, namespace = _made("def f(x):\n    return x * factor\n", factor=2)
    assert pool.apply(f, (3,)) == 6
    assert pool._function_blob(f) is pool._function_blob(f), "the pickle is reused"
    namespace["factor"] = 5
    assert pool.apply(f, (3,)) == 15
    namespace["factor"] = 2.5
    assert pool.apply(f, (2,)) == 5.0


def test_a_rebound_closure_default_or_helper_is_seen(pool):
    k = 2

    def by(x):
        return x * k

    assert pool.apply(by, (3,)) == 6
    k = 7
    assert pool.apply(by, (3,)) == 21

    def scaled(x, factor=2):
        return x * factor

    assert pool.apply(scaled, (3,)) == 6
    scaled.__defaults__ = (4,)
    assert pool.apply(scaled, (3,)) == 12

    f, namespace = _made("def helper(x):\n    return x + 1\ndef f(x):\n    return helper(x)\n")
    assert pool.apply(f, (1,)) == 2
    exec("def helper(x):\n    return x + 100\n", namespace)
    assert pool.apply(f, (1,)) == 101


def test_what_can_change_in_place_is_pickled_at_every_call(pool):
    data = [1]

    def first(_):
        return data[0]

    assert _functions.fingerprint(first) is None
    assert pool.apply(first, (0,)) == 1
    data[0] = 9
    assert pool.apply(first, (0,)) == 9
    f, namespace = _made("def f(_):\n    return table['a']\n", table={"a": 1})
    assert pool.apply(f, (0,)) == 1
    namespace["table"]["a"] = 2
    assert pool.apply(f, (0,)) == 2

    def tagged(x):
        return x

    tagged.note = "attributes can change"
    assert _functions.fingerprint(tagged) is None

    # A bound builtin method pickles the object it belongs to.
    values = [5]
    f, namespace = _made("def f(_):\n    return get(0)\n", get=values.__getitem__)
    assert _functions.fingerprint(f) is None
    assert pool.apply(f, (0,)) == 5
    values[0] = 6
    assert pool.apply(f, (0,)) == 6


def test_fingerprints_follow_what_functions_refer_to():
    f, namespace = _made("import os\ndef f(x):\n    return os.getpid() + len(x) + n\n", n=1)
    a = _functions.fingerprint(f)
    assert a is not None and _functions.same(a, _functions.fingerprint(f))
    namespace["n"] = 2
    assert not _functions.same(a, _functions.fingerprint(f))
