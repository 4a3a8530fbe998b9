"""A results file names the code that ran: the checkout when the command started."""

import subprocess

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


def test_changed_results_are_not_changed_code(tmp_path, monkeypatch):
    # a benchmark run after another in the same checkout names the commit, not "+changes" for the
    # first one's results file; a changed source file is still said
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "results").mkdir()
    for f in ("code.py", "RESULTS.md", "results/table.txt"):
        (tmp_path / f).write_text("one\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    head = provenance._head()
    assert len(head) >= 7 and provenance._checkout() == head
    (tmp_path / "results/table.txt").write_text("two\n")
    (tmp_path / "RESULTS.md").write_text("two\n")
    assert provenance._checkout() == head
    (tmp_path / "code.py").write_text("two\n")
    assert provenance._checkout() == head + "+changes"
