"""A results file names the code that ran: the checkout when the command started."""

from engine import provenance


def test_the_commit_is_the_one_at_the_start(monkeypatch):
    state = {"now": "aaa1111"}
    monkeypatch.setattr(provenance, "_checkout", lambda: state["now"])
    monkeypatch.setattr(provenance, "_head", lambda: state["now"].split("+")[0])
    monkeypatch.setattr(provenance, "_AT_START", [])
    assert provenance.commit() == "aaa1111"  # no start recorded: the checkout now
    provenance.start()
    state["now"] = "bbb2222"  # a commit lands while a long command runs
    provenance.start()  # a second call keeps the first
    assert provenance.commit() == "aaa1111 (checkout at bbb2222 when written)"
    state["now"] = "aaa1111+changes"  # the command's own results files dirty the checkout: not noted
    assert provenance.stamp()["commit"] == "aaa1111"
