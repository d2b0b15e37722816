"""Bad values typed into the dashboard: each shows a message (never a traceback) and queues nothing;
a job whose worker died shows as failed with its reason and can be resumed from the page."""

from __future__ import annotations

import pytest

from mergelab.sweep.jobs import JobQueue
from mergelab.sweep.plan import SweepJob
from tests.helpers import wait_until
from tests.test_app import env, run  # noqa: F401 - env is a fixture

pytestmark = pytest.mark.slow


def test_bad_manifest_paths_in_the_sweep_form(env, tally):  # noqa: F811
    root = env.parent
    (root / "notes.toml").write_text("this is = = not toml")
    (root / "empty-dir").mkdir()
    (root / "broken.toml").write_text(env.read_text().replace('name = "tiny"\n', ""))
    cases = ["../../etc/passwd", "/etc/passwd", "/nonexistent/family.toml", str(root / "empty-dir"),
             str(root / "notes.toml"), str(root / "broken.toml"), str(root / "family.toml\x00.png"), "~/../../etc",
             str(root / "s" / "base"), "   "]
    at = run("pages/2_Sweep.py")
    at.selectbox(key="sweep-family").set_value("other path…").run()
    for value in cases:
        at.text_input[0].input(value).run()
        assert not at.exception, (value, [e.value for e in at.exception])
        shown = " ".join(e.value for e in at.error) + " ".join(i.value for i in at.info)
        assert shown, value
        assert not any(b.label == "Launch sweep" for b in at.button), value  # no form to launch from
    assert JobQueue().list() == []
    tally["bad inputs tried: UI form values"] += len(cases)


def test_launch_without_sizes_or_methods_is_refused(env, tally):  # noqa: F811
    for widget in ("Sizes", "Methods"):
        at = run("pages/2_Sweep.py")
        at.selectbox(key="sweep-family").set_value("other path…").run()
        at.text_input[0].input(str(env)).run()
        next(m for m in at.multiselect if m.label == widget).set_value([])  # sent with the form's submit
        next(b for b in at.button if b.label == "Launch sweep").click().run()
        assert not at.exception
        assert any("Pick at least one size and one method" in e.value for e in at.error)
    assert JobQueue().list() == []
    tally["bad inputs tried: UI form values"] += 2


def test_a_job_whose_worker_died_shows_failed_and_resumes(env, monkeypatch, tally):  # noqa: F811
    monkeypatch.setenv("MERGELAB_WORKER_IDLE", "2")  # the worker Resume starts exits soon after the job
    queue = JobQueue()
    job_id = queue.submit(SweepJob(str(env), {"average": {}}, device="cpu"))
    queue.claim_next(worker_pid=999_999_999)  # running, but no worker holds the queue lock: it died
    at = run("pages/2_Sweep.py")
    assert queue.get(job_id).status == "failed"
    text = " ".join(e.value for e in at.error)
    assert "worker process died" in text and "resume" in text
    next(b for b in at.button if b.label == "Resume").click().run()
    assert wait_until(lambda: queue.get(job_id).status == "done", timeout=300), queue.get(job_id)
    tally["worker deaths shown and resumed in the UI"] += 1
