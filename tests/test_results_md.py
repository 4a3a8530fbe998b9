"""RESULTS.md says who made each section: a report assembled stage by stage over many invocations
(the candidate screen) names every invocation's commit, never only the last one's."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import results_md  # noqa: E402


def _write(tmp_path: Path, meta: dict) -> tuple[str, str]:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.md").write_text("| a |\n|---|\n| 1 |\n")
    (tmp_path / "r" / "report.json").write_text(json.dumps(meta))
    return "r/report.md", "r/report.json"


def test_a_staged_report_names_every_invocation(tmp_path, monkeypatch):
    def by(cmd, commit):
        return {"command": cmd, "commit": commit}
    meta = {"command": "python experiments/default_candidates.py --only B --stages rotation", "commit": "ccc",
            "results": {"A": {"settings": {"n": 8}, "training": {"train_seconds": 1.0, "by": by("x --only A", "aaa")},
                              "samples": {"confident": 3, "by": by("x --only A --stages samples", "bbb")}},
                        "B": {"rotation": {"gap": 0.1, "by": by("python experiments/default_candidates.py --only B "
                                                                 "--stages rotation", "ccc")}}}}
    monkeypatch.setattr(results_md, "ROOT", tmp_path)
    report, js = _write(tmp_path, meta)
    made = results_md.section("t", report, js, [], "how")[2]
    assert made.startswith("Made stage by stage by `python experiments/default_candidates.py`: 3 invocations")
    assert all(c in made for c in ("aaa", "bbb", "ccc"))


def test_a_one_command_report_keeps_its_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(results_md, "ROOT", tmp_path)
    report, js = _write(tmp_path, {"command": "python -m engine figure2 --run r", "commit": "abc1234",
                                   "results": {"original": [4.0]}})
    assert results_md.section("t", report, js, [], "how")[2] == "Made by `python -m engine figure2 --run r` at commit abc1234."


def test_a_markdown_report_stamped_under_its_title_keeps_its_stamp(tmp_path, monkeypatch):
    # results/gpu.md: "# GPU check", a blank line, then its command and commit
    monkeypatch.setattr(results_md, "ROOT", tmp_path)
    (tmp_path / "gpu.md").write_text("# GPU check\n\n`python benchmarks/gpu_check.py --offline` at commit 1234abc+changes\n\n"
                                     "| check | result |\n|---|---|\n| device | X |\n")
    out = results_md.section("GPU", "gpu.md", None, [], "how")
    assert out[2] == "Made by `python benchmarks/gpu_check.py --offline` at commit 1234abc+changes."
    (tmp_path / "old.md").write_text("# GPU check\n\n**Not yet measured.**\n")  # no stamp: said so
    assert "predates results that record" in results_md.section("GPU", "old.md", None, [], "how")[2]
