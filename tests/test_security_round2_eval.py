"""Security review, round 2: evaluations.

- The identifier and class noun (client text: ``params.evaluate`` or words of the instance prompt) were
  substituted into the DreamBooth templates, written to a prompt file and formatted a second time, so an
  identifier ``{class_noun:>400000000}`` made the train worker build a 400 MB string (100 characters could ask
  for 40 GB). They are now substituted once, literally: bounded time and memory, the literal text in the prompt.
- The uploaded reference images of an evaluation are deleted on every path that ends it (succeeded, failed, given
  up, adapter deleted), and left to the worker that took the lease over while it still runs.
"""

from __future__ import annotations

import time
import tracemalloc
from datetime import timedelta

import pytest
from helpers.api import png

from shared.eval.prompts import (
    MAX_SUBJECT_WORD_CHARS,
    check_subject_word,
    clip_t_text,
    evaluation_prompts,
    fill_template,
)
from shared.training_spec import EvaluationRequest

# The review's input, and a 100-character one that nests fields (each `{class_noun:>{class_noun}}` asked the
# second format for a 10 GB string when the class noun is "9999999999"; three of them and a 10 MB one).
WIDE = "{class_noun:>400000000}"
NESTED = ("{class_noun:>{class_noun}}" * 3 + "{class_noun:>9999999}").ljust(MAX_SUBJECT_WORD_CHARS, "x")
ATTACKS = [
    (WIDE, "dog"),
    (NESTED, "9999999999"),
    ("{identifier}{class_noun}{0}{{}}", "{identifier.__class__}"),  # fields, indexes, attributes, escapes
    ("sks", "{class_noun:>400000000}"),  # the class noun is client text too
]


class StopBeforeModels(Exception):
    pass


def _bounded(call):
    """(result, seconds, tracemalloc peak bytes) of ``call()``."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = call()
    finally:
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, seconds, peak


@pytest.mark.parametrize(("identifier", "class_noun"), ATTACKS)
def test_client_words_fill_the_templates_literally_in_bounded_time_and_memory(identifier, class_noun):
    assert len(NESTED) == MAX_SUBJECT_WORD_CHARS
    prompts, seconds, peak = _bounded(
        lambda: evaluation_prompts("default", identifier=identifier, class_noun=class_noun)
    )
    assert seconds < 1.0 and peak < 10 * 1024 * 1024, (seconds, peak)
    assert len(prompts) == 25
    assert prompts[0].prompt == f"a {identifier} {class_noun} in the jungle"
    assert all(identifier in p.prompt and class_noun in p.prompt for p in prompts)
    assert all(len(p.prompt) < 300 and len(p.text) < 300 for p in prompts)


@pytest.mark.parametrize(("identifier", "class_noun"), ATTACKS)
def test_the_worker_path_formats_once(identifier, class_noun, tmp_path, monkeypatch):
    """`workers.evaluation.score_adapter` → `shared.eval.run.evaluate` → the prompts the pipeline is asked for:
    literal, bounded (the models are stopped before they load)."""
    import shared.eval.run
    from workers.evaluation import score_adapter

    asked: list[str] = []

    def generate_images(base, adapter, prompts, seeds, **_):
        asked.extend(prompts)
        raise StopBeforeModels

    monkeypatch.setattr(shared.eval.run, "generate_images", generate_images)
    references = tmp_path / "references"
    references.mkdir()
    (references / "00.png").write_bytes(png(0))
    state = EvaluationRequest(identifier=identifier, class_noun=class_noun, prompts=4).initial_state(
        instance_prompt="", clip_model="tiny-clip", dino_model="tiny-dino", reference_images=1, requested_at=""
    )

    def score():
        with pytest.raises(StopBeforeModels):
            score_adapter(
                base_model="tiny-sd",
                adapter_path=tmp_path / "adapter.safetensors",
                reference_dir=references,
                state=state,
                device="cpu",
                work=tmp_path,
            )

    _, seconds, peak = _bounded(score)
    assert seconds < 1.0 and peak < 10 * 1024 * 1024, (seconds, peak)
    assert len(asked) == 4 and asked[0] == f"a {identifier} {class_noun} in the jungle"
    assert not (tmp_path / "prompts.txt").exists()  # no file of filled-in prompts read back as templates


def test_the_identifier_read_off_the_instance_prompt_is_literal_too(tmp_path):
    request = EvaluationRequest()
    identifier, class_noun = request.subject_words(f"a photo of {WIDE} dog")
    assert (identifier, class_noun) == (WIDE, "dog")
    prompts, seconds, peak = _bounded(lambda: evaluation_prompts(identifier=identifier, class_noun=class_noun))
    assert seconds < 1.0 and peak < 10 * 1024 * 1024
    assert prompts[1].prompt == f"a {WIDE} dog in the snow" and prompts[1].text == "a dog in the snow"


def test_subject_words_are_checked():
    assert check_subject_word("the identifier", "x" * MAX_SUBJECT_WORD_CHARS)
    for bad in ("x" * (MAX_SUBJECT_WORD_CHARS + 1), "sks\ndog", "sks\x00", "a\tb", "\x1b[31m"):
        with pytest.raises(ValueError, match="identifier"):
            evaluation_prompts(identifier=bad, class_noun="dog")
        with pytest.raises(ValueError, match="class noun"):
            evaluation_prompts(identifier="sks", class_noun=bad)


def test_trusted_templates_keep_their_rules():
    assert fill_template("a {{literal}} {identifier} {class_noun}", identifier="{x}", class_noun="}") == (
        "a {literal} {x} }"
    )
    for template in ("a {0} dog", "a {identifier!r}", "a {nonesuch}", "a { dog", "a } dog"):
        with pytest.raises(ValueError, match="unknown field"):
            fill_template(template, identifier="sks", class_noun="dog")
    # Backslashes in the class noun are text, not regular-expression escapes.
    assert clip_t_text("a photo of sks", "sks", r"\g<0>\1") == r"a photo of \g<0>\1"
    assert evaluation_prompts(["{identifier} {class_noun}"], identifier="sks", class_noun="dog")[0].prompt == "sks dog"


# Reference images: who deletes them, and evaluations as jobs of the train queue ---------------------------


@pytest.fixture
def evaluation(api):
    """An adapter with a queued evaluation (a row of ``evaluations``) and two reference images in storage;
    (runtime, evaluation id, keys, adapter id)."""
    from shared.db import Adapter, Evaluation, new_id, utcnow
    from shared.tenants import tenant_for_key
    from workers.runtime import Runtime

    storage = api.context.storage
    with api.context.sessions() as session:
        tenant = tenant_for_key(session, api.keys["acme"])
        adapter_id, evaluation_id = new_id("adp"), new_id("evl")
        prefix = f"tenants/{tenant.id}/adapters/{adapter_id}"
        keys = [f"{prefix}/evaluation/{evaluation_id}/{i:02d}.png" for i in range(2)]
        state = EvaluationRequest(class_noun="dog").initial_state(
            instance_prompt="a photo of sks dog",
            clip_model="tiny-clip",
            dino_model="tiny-dino",
            reference_images=2,
            requested_at=utcnow().isoformat(),
        )
        session.add(
            Adapter(
                id=adapter_id, tenant_id=tenant.id, base_model="tiny-sd", config={}, num_parameters=1, size_bytes=1,
                sha256="0" * 64, storage_key=f"{prefix}.safetensors",
            )
        )  # fmt: skip
        session.flush()
        params = {k: state[k] for k in ("prompts", "images_per_prompt", "steps", "class_noun", "identifier", "models",
                                        "reference_images")}  # fmt: skip
        session.add(
            Evaluation(
                id=evaluation_id, tenant_id=tenant.id, adapter_id=adapter_id, base_model="tiny-sd", params=params,
                reference_keys=keys, cost=10.0, enqueued_at=utcnow(),
            )
        )  # fmt: skip
        session.commit()
    storage.put_bytes(f"{prefix}.safetensors", b"adapter")
    for i, key in enumerate(keys):
        storage.put_bytes(key, png(i))
    rt = Runtime(settings=api.context.settings, sessions=api.context.sessions, storage=storage, owner="test")
    return rt, evaluation_id, keys, adapter_id


def _row(rt, evaluation_id):
    from shared.db import Evaluation

    with rt.sessions() as session:
        row = session.get(Evaluation, evaluation_id)
        if row is not None:
            session.expunge(row)
        return row


def _update(rt, evaluation_id, **values):
    from sqlalchemy import update

    from shared.db import Evaluation

    with rt.sessions() as session:
        session.execute(update(Evaluation).where(Evaluation.id == evaluation_id).values(**values))
        session.commit()


def _stored(rt, keys):
    return [key for key in keys if rt.storage.exists(key)]


def _claimed_by(rt, evaluation_id, owner="test"):
    from shared.db import Evaluation
    from workers.lease import claim

    with rt.sessions() as session:
        assert claim(session, Evaluation, evaluation_id, owner, 60)


def _score_then(monkeypatch, change=lambda: None, fail=False):
    """Make `score_adapter` call ``change()`` (what happens to the row while this worker scores) and succeed."""
    import workers.evaluation

    def score_adapter(**_):
        change()
        if fail:
            raise RuntimeError("the scoring model is missing")
        return {"clip_i": 0.5, "clip_t": 0.25, "dino": 0.125}

    monkeypatch.setattr(workers.evaluation, "score_adapter", score_adapter)


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_an_evaluation_that_ends_deletes_its_images_and_records_its_usage(evaluation, monkeypatch, outcome):
    from sqlalchemy import select

    from shared.db import UsageRecord
    from workers.evaluation import run_claimed_evaluation

    rt, evaluation_id, keys, _ = evaluation
    _claimed_by(rt, evaluation_id)
    _score_then(monkeypatch, fail=outcome == "failed")
    assert run_claimed_evaluation(rt, evaluation_id) == outcome
    row = _row(rt, evaluation_id)
    assert row.status == outcome and row.reference_keys == [] and row.lease_owner is None
    assert (row.scores == {"clip_i": 0.5, "clip_t": 0.25, "dino": 0.125}) == (outcome == "succeeded")
    assert _stored(rt, keys) == []
    with rt.sessions() as session:
        usage = session.scalars(select(UsageRecord).where(UsageRecord.job_id == evaluation_id)).one()
    assert usage.kind == "evaluation" and usage.status == outcome and usage.images == 4 * 2


def test_an_evaluation_given_up_after_its_attempts_deletes_its_images(evaluation):
    from shared.db import utcnow
    from workers.lease import MAX_ATTEMPTS
    from workers.reaper import reap_once

    rt, evaluation_id, keys, _ = evaluation
    rt.send = lambda *a, **k: None
    expired = utcnow() - timedelta(minutes=1)
    _update(rt, evaluation_id, status="running", lease_owner="gone", lease_expires_at=expired, attempts=MAX_ATTEMPTS)
    reap_once(rt)
    row = _row(rt, evaluation_id)
    assert row.status == "failed" and row.error_code == "worker_lost" and row.reference_keys == []
    assert _stored(rt, keys) == []


def test_a_crashed_evaluation_is_sent_again_and_taken_over(evaluation):
    from shared.db import Evaluation, utcnow
    from workers.lease import claim_next_job
    from workers.reaper import reap_once

    rt, evaluation_id, keys, _ = evaluation
    sent = []
    rt.send = lambda task, job_id, **_: sent.append((task, job_id))
    _update(rt, evaluation_id, status="running", lease_owner="gone", lease_expires_at=utcnow() - timedelta(minutes=1),
            attempts=1)  # fmt: skip
    reap_once(rt)
    assert ("krona.evaluate", evaluation_id) in sent
    with rt.sessions() as session:  # its message resumes it first, before any queued job
        assert claim_next_job(session, (Evaluation,), rt.settings, "b", 60, message_job_id=evaluation_id) == (
            Evaluation,
            evaluation_id,
        )
    assert _stored(rt, keys) == keys


def test_a_lease_taken_over_by_another_worker_leaves_the_images_to_it(evaluation, monkeypatch):
    from shared.db import utcnow
    from workers.evaluation import run_claimed_evaluation

    rt, evaluation_id, keys, _ = evaluation
    _claimed_by(rt, evaluation_id)
    live = utcnow() + timedelta(hours=1)
    _score_then(monkeypatch, lambda: _update(rt, evaluation_id, lease_owner="b", lease_expires_at=live))
    assert run_claimed_evaluation(rt, evaluation_id) == "lease_lost"
    assert _stored(rt, keys) == keys  # worker b still reads them
    row = _row(rt, evaluation_id)
    assert row.lease_owner == "b" and row.status == "running"


def test_an_adapter_deleted_during_its_evaluation_takes_the_images_with_it(evaluation, api, monkeypatch):
    from workers.evaluation import run_claimed_evaluation

    rt, evaluation_id, keys, adapter_id = evaluation
    _claimed_by(rt, evaluation_id)

    def deleted():
        answer = api.client.delete(f"/v1/adapters/{adapter_id}", headers=api.headers())
        assert answer.status_code == 204

    _score_then(monkeypatch, deleted)
    assert run_claimed_evaluation(rt, evaluation_id) == "lease_lost"
    assert _stored(rt, keys) == [] and _row(rt, evaluation_id) is None


def test_an_evaluation_with_a_bad_identifier_fails_before_downloading(evaluation, monkeypatch):
    import workers.evaluation
    from workers.evaluation import run_claimed_evaluation

    rt, evaluation_id, keys, _ = evaluation
    row = _row(rt, evaluation_id)
    _update(rt, evaluation_id, params={**row.params, "identifier": "sks\ndog"})
    _claimed_by(rt, evaluation_id)
    monkeypatch.setattr(workers.evaluation, "score_adapter", lambda **_: pytest.fail("scored a bad identifier"))
    assert run_claimed_evaluation(rt, evaluation_id) == "failed"
    row = _row(rt, evaluation_id)
    assert "printable" in row.error_message and _stored(rt, keys) == []
