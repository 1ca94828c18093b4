"""Security review, round 2: evaluations.

- The identifier and class noun (client text: ``params.evaluate`` or words of the instance prompt) were
  substituted into the DreamBooth templates, written to a prompt file and formatted a second time, so an
  identifier ``{class_noun:>400000000}`` made the train worker build a 400 MB string (100 characters could ask
  for 40 GB). They are now substituted once, literally: bounded time and memory, the literal text in the prompt.
- The uploaded reference images of an evaluation are deleted on every path that ends it (given up, found ended,
  lease lost, adapter deleted), and left to the worker that took the lease over while it still runs.
"""

from __future__ import annotations

import time
import tracemalloc
from datetime import timedelta

import pytest
from api_helpers import png

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


# Reference images: who deletes them -----------------------------------------------------------------------


@pytest.fixture
def evaluation(api):
    """An adapter whose evaluation is queued with two reference images in storage; (runtime, adapter id, keys)."""
    from shared.db import Adapter, new_id, utcnow
    from shared.tenants import tenant_for_key
    from workers.runtime import Runtime

    storage = api.context.storage
    with api.context.sessions() as session:
        tenant = tenant_for_key(session, api.keys["acme"])
        adapter_id = new_id("adp")
        prefix = f"tenants/{tenant.id}/adapters/{adapter_id}"
        keys = [f"{prefix}/evaluation/evl_test/{i:02d}.png" for i in range(2)]
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
                sha256="0" * 64, storage_key=f"{prefix}.safetensors", evaluation={**state, "reference_keys": keys},
            )
        )  # fmt: skip
        session.commit()
    storage.put_bytes(f"{prefix}.safetensors", b"adapter")
    for i, key in enumerate(keys):
        storage.put_bytes(key, png(i))
    rt = Runtime(settings=api.context.settings, sessions=api.context.sessions, storage=storage, owner="test")
    return rt, adapter_id, keys


def _state(rt, adapter_id):
    from shared.db import Adapter

    with rt.sessions() as session:
        row = session.get(Adapter, adapter_id)
        return None if row is None else dict(row.evaluation or {})


def _set_state(rt, adapter_id, **changes):
    from shared.db import Adapter

    with rt.sessions() as session:
        row = session.get(Adapter, adapter_id)
        row.evaluation = {**row.evaluation, **changes}
        session.commit()


def _stored(rt, keys):
    return [key for key in keys if rt.storage.exists(key)]


def test_an_evaluation_given_up_after_its_attempts_deletes_its_images(evaluation):
    from workers.evaluation import run_evaluation_job
    from workers.lease import MAX_ATTEMPTS

    rt, adapter_id, keys = evaluation
    _set_state(rt, adapter_id, attempts=MAX_ATTEMPTS)
    assert run_evaluation_job(rt, adapter_id) == "skipped"
    state = _state(rt, adapter_id)
    assert state["status"] == "failed" and "gave up" in state["error"]["message"]
    assert "reference_keys" not in state and "lease_owner" not in state
    assert _stored(rt, keys) == []


def test_an_ended_evaluation_still_listing_images_deletes_them_when_its_message_comes_again(evaluation):
    from workers.evaluation import run_evaluation_job

    rt, adapter_id, keys = evaluation
    _set_state(rt, adapter_id, status="failed")  # as the give-up path of the previous version left it
    assert run_evaluation_job(rt, adapter_id) == "skipped"
    assert "reference_keys" not in _state(rt, adapter_id) and _stored(rt, keys) == []


def test_a_repeated_message_while_another_worker_runs_it_leaves_the_images(evaluation):
    from shared.db import utcnow
    from workers.evaluation import run_evaluation_job

    rt, adapter_id, keys = evaluation
    live = (utcnow() + timedelta(hours=1)).isoformat()
    _set_state(rt, adapter_id, status="running", lease_owner="other", lease_expires_at=live, attempts=1)
    assert run_evaluation_job(rt, adapter_id) == "skipped"
    assert _stored(rt, keys) == keys and _state(rt, adapter_id)["reference_keys"] == keys


def _score_then(rt, adapter_id, monkeypatch, change):
    """Make `score_adapter` call ``change()`` (what happens to the row while this worker scores) and succeed."""
    import workers.evaluation

    def score_adapter(**_):
        change()
        return {"clip_i": 0.5, "clip_t": 0.25, "dino": 0.125}

    monkeypatch.setattr(workers.evaluation, "score_adapter", score_adapter)


def test_a_lease_taken_over_by_a_running_worker_leaves_the_images_to_it(evaluation, monkeypatch):
    from shared.db import utcnow
    from workers.evaluation import run_evaluation_job

    rt, adapter_id, keys = evaluation
    live = (utcnow() + timedelta(hours=1)).isoformat()
    _score_then(rt, adapter_id, monkeypatch, lambda: _set_state(rt, adapter_id, lease_owner="b", lease_expires_at=live))
    assert run_evaluation_job(rt, adapter_id) == "lease_lost"
    assert _stored(rt, keys) == keys  # worker b still reads them
    assert _state(rt, adapter_id)["lease_owner"] == "b"


def test_a_lease_lost_to_a_worker_that_already_finished_deletes_what_is_left(evaluation, monkeypatch):
    from workers.evaluation import run_evaluation_job

    rt, adapter_id, keys = evaluation

    def b_finished():  # b took the lease over and ended it, but could not delete the images (storage blip)
        from shared.db import Adapter

        with rt.sessions() as session:
            row = session.get(Adapter, adapter_id)
            ended = {k: v for k, v in row.evaluation.items() if k not in ("lease_owner", "reference_keys")}
            row.evaluation = {**ended, "status": "succeeded"}
            session.commit()

    _score_then(rt, adapter_id, monkeypatch, b_finished)
    assert run_evaluation_job(rt, adapter_id) == "lease_lost"
    assert _stored(rt, keys) == []
    assert _state(rt, adapter_id)["status"] == "succeeded"


def test_a_request_replaced_meanwhile_deletes_the_old_images_only(evaluation, monkeypatch):
    from workers.evaluation import run_evaluation_job

    rt, adapter_id, keys = evaluation
    new_keys = [key.replace("evl_test", "evl_next") for key in keys]
    for key in new_keys:
        rt.storage.put_bytes(key, b"new")

    def replaced():  # the gateway accepted a new request over this one (its lease had expired)
        _set_state(rt, adapter_id, status="queued", lease_owner=None, reference_keys=new_keys)

    _score_then(rt, adapter_id, monkeypatch, replaced)
    assert run_evaluation_job(rt, adapter_id) == "lease_lost"
    assert _stored(rt, keys) == [] and _stored(rt, new_keys) == new_keys


def test_an_adapter_deleted_during_its_evaluation_takes_the_images_with_it(evaluation, monkeypatch):
    from shared.db import Adapter
    from workers.evaluation import run_evaluation_job

    rt, adapter_id, keys = evaluation

    def deleted():
        with rt.sessions() as session:
            session.delete(session.get(Adapter, adapter_id))
            session.commit()

    _score_then(rt, adapter_id, monkeypatch, deleted)
    assert run_evaluation_job(rt, adapter_id) == "lease_lost"
    assert _stored(rt, keys) == []


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_an_evaluation_that_ends_deletes_its_images(evaluation, monkeypatch, outcome):
    import workers.evaluation
    from workers.evaluation import run_evaluation_job

    rt, adapter_id, keys = evaluation

    def score_adapter(**_):
        if outcome == "failed":
            raise RuntimeError("the scoring model is missing")
        return {"clip_i": 0.5, "clip_t": 0.25, "dino": 0.125}

    monkeypatch.setattr(workers.evaluation, "score_adapter", score_adapter)
    assert run_evaluation_job(rt, adapter_id) == outcome
    state = _state(rt, adapter_id)
    assert state["status"] == outcome and "reference_keys" not in state and "lease_owner" not in state
    assert _stored(rt, keys) == []


def test_an_evaluation_with_a_bad_identifier_fails_before_downloading(evaluation, monkeypatch):
    import workers.evaluation
    from workers.evaluation import run_evaluation_job

    rt, adapter_id, keys = evaluation
    _set_state(rt, adapter_id, identifier="sks\ndog")
    monkeypatch.setattr(workers.evaluation, "score_adapter", lambda **_: pytest.fail("scored a bad identifier"))
    assert run_evaluation_job(rt, adapter_id) == "failed"
    state = _state(rt, adapter_id)
    assert "printable" in state["error"]["message"] and _stored(rt, keys) == []
