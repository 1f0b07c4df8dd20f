"""Prompts over HTTP: the schema's bounds on `prompt` and `negative_prompt`, planning that matches the
condition to the model (class or text), the deny-list input policy, the per-row conditions of a batch,
and the app in this process (real ingress, planning, policy, cache, jobs, state store, signer and rendering;
only the Serve handles are in-process stand-ins) with every body field fuzzed; then one deployment on
the real stack (Ray Serve over HTTP) with a tiny text checkpoint."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dtrain.serving.config import ServeArgs
from dtrain.serving.planning import Job, PlanError, plan
from dtrain.serving.policy import InputPolicy, compile_rules
from dtrain.serving.schemas import MAX_PROMPT_CHARS, GenerateRequest

CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "one small red square", "three big circles"]
DENY = {"deny_classes": {"*": [6]}, "deny_words": ["forbidden", "Two Words"], "deny_patterns": [r"\bsecrets?\b"]}


def write_text_checkpoint(path, seed: int = 0):
    """An untrained tiny text DiT with its tokenizer; every weight perturbed (adaLN-Zero starts at a zero
    velocity, which no prompt would change)."""
    from dtrain.checkpoint import write_inference_files
    from dtrain.config import load_config
    from dtrain.data.captions import train_tokenizer
    from dtrain.models import build_model

    cfg = load_config(None, ["model.conditioning=text", "model.size=tiny", "model.image_size=8", "model.patch_size=2",
                             "model.max_tokens=8", "model.vocab_size=64", "sample.steps=2", "sample.guidance=2.0"])
    torch.manual_seed(seed)
    weights = {k: v + 0.1 * torch.randn_like(v) for k, v in build_model(cfg.model).state_dict().items()}
    write_inference_files(path, weights, cfg, {"step": 1}, tokenizer=train_tokenizer(CAPTIONS, vocab_size=64).to_str())
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Renders in this process on one thread: a tiny model's matmuls are too small to share, and two
    threads on a busy 2-core machine spin-wait for each other (1-2 s a render against 15 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    return write_text_checkpoint(tmp_path_factory.mktemp("words") / "words" / "v1")


def loaded(ckpt):
    from dtrain.checkpoint import load_model, read_meta, read_tokenizer
    from dtrain.serving.sampler import Loaded

    net, cfg = load_model(ckpt)
    return Loaded(net.eval(), cfg, read_meta(ckpt), "fp32", read_tokenizer(ckpt))


# --- the schema, planning and the policy -------------------------------------------------------

def test_prompts_are_bounded_printable_text_refused_by_field_without_echoing_them():
    ok = GenerateRequest(prompt="Un café ☕ — 2 «blue» squares", negative_prompt="")
    assert (ok.prompt, ok.negative_prompt, ok.class_label) == ("Un café ☕ — 2 «blue» squares", "", None)
    assert GenerateRequest(prompt="x" * MAX_PROMPT_CHARS).prompt == "x" * MAX_PROMPT_CHARS
    for field in ("prompt", "negative_prompt"):
        for bad in ("x" * (MAX_PROMPT_CHARS + 1), "nul\x00", "line\nbreak", "tab\there", "zero\u200bwidth",
                    "bidi\u202eoverride", "line\u2028sep", "lone \ud800", "private \ue000", "\x7f", 7, ["a"]):
            with pytest.raises(ValidationError) as e:
                GenerateRequest(**{field: bad})
            (err,) = e.value.errors()
            assert err["loc"] == (field,), (field, bad, err)
            if isinstance(bad, str) and len(bad) < 50:
                assert bad not in err["msg"], err["msg"]  # the position and code point, not the text
    with pytest.raises(ValidationError, match=r"character 3 \(U\+0000\)"):
        GenerateRequest(prompt="nul\x00")


def info(conditioning: str) -> dict:
    """A catalog entry as dtrain.serving.app.version_info makes it (the fields planning reads)."""
    cond = {"num_classes": 10} if conditioning == "class" else {"max_prompt_chars": MAX_PROMPT_CHARS, "max_tokens": 8}
    return {"conditioning": conditioning, **cond, "flow_map": False,
            "defaults": {"sampler": "euler", "steps": 4, "guidance": 2.0}}


SPECS = {"words": ServeArgs(models={"words": {"versions": {"v1": "/c/w"}}}).models["words"],
         "digits": ServeArgs(models={"digits": {"versions": {"v1": "/c/d"}}}).models["digits"]}
CATALOG = {"words": {"v1": info("text")}, "digits": {"v1": info("class")}}


def planned(**body):
    return plan(GenerateRequest(**body), SPECS, CATALOG, max_steps=10, max_images=4, in_flight=1, draw=lambda: 0.5)


def test_planning_takes_a_prompt_for_a_text_model_and_a_class_for_a_class_model():
    p = planned(prompt="a red circle", negative_prompt="blue", seed=3, num_images=2)
    assert p.job == Job(None, (3, 4), "euler", 4, 2.0, prompt="a red circle", negative_prompt="blue")
    assert planned(prompt="").job.prompt == ""  # the empty prompt: unconditional, the null condition
    assert planned(model="digits", class_label=3).job == Job(3, (0,), "euler", 4, 2.0)
    # the response cache keys on the job: another prompt or negative prompt is another entry
    jobs = [planned(prompt="a").job, planned(prompt="b").job, planned(prompt="a", negative_prompt="c").job,
            planned(prompt="a", negative_prompt="").job]
    assert len(set(jobs)) == 4
    for body, field, msg in (({"class_label": 1}, "class_label", "words/v1 is text-conditioned: give prompt"),
                             ({}, "prompt", "required: words/v1 is text-conditioned"),
                             ({"negative_prompt": "x"}, "prompt", "required"),
                             ({"model": "digits", "prompt": "a"}, "prompt", "digits/v1 is class-conditional"),
                             ({"model": "digits", "class_label": 1, "negative_prompt": "a"}, "negative_prompt",
                              "class-conditional: give class_label, not negative_prompt"),
                             ({"model": "digits"}, "class_label", "required: digits/v1 is class-conditional (0..9)"),
                             ({"model": "digits", "class_label": 10}, "class_label", "must be < 10"),
                             ({"prompt": "a", "steps": 11}, "steps", "must be <= 10")):
        with pytest.raises(PlanError) as e:
            planned(**body)
        assert e.value.field == field and msg in e.value.msg, (body, e.value)


def test_the_deny_list_matches_whole_words_in_any_case_or_width_and_patterns_anywhere():
    policy = InputPolicy(**DENY)
    denied = lambda **body: policy.check("words", GenerateRequest(**body))  # noqa: E731
    for prompt, rule in (("a FORBIDDEN circle", "deny_words[0]"), ("ｆｏｒｂｉｄｄｅｎ", "deny_words[0]"),
                         ("forbidden!", "deny_words[0]"), ("two   words", "deny_words[1]"),
                         ("all my secrets", "deny_patterns[0]"), ("SECRET", "deny_patterns[0]")):
        r = denied(prompt=prompt)
        assert (r.code, r.field, r.rule) == ("denied_prompt", "prompt", rule), prompt
        assert prompt not in r.message and prompt.lower() not in r.message.lower()
    for prompt in ("unforbiddenly", "two", "words two", "secretary", "", "a red circle"):
        assert denied(prompt=prompt) is None, prompt
    # a negative prompt too: at guidance below 1 it pulls towards what it names
    r = denied(prompt="a red circle", negative_prompt="forbidden")
    assert (r.code, r.field) == ("denied_prompt", "negative_prompt")
    # classes as before, for every model ("*") or one
    assert denied(class_label=6).code == "denied_class" and denied(class_label=5) is None
    assert InputPolicy({}).check("words", GenerateRequest(prompt="forbidden")) is None  # default: nothing denied


def test_bad_deny_rules_fail_at_deploy_naming_the_rule():
    for words, patterns, match in (([" "], [], r"deny_words\[0\] is empty"), ([], ["ok", "("], r"deny_patterns\[1\]"),
                                   ([], ["x*"], r"deny_patterns\[0\] 'x\*' matches the empty prompt")):
        with pytest.raises(ValueError, match=match):
            compile_rules(words, patterns)
        with pytest.raises(ValidationError, match=match):
            ServeArgs(checkpoint="unused", deny_words=words, deny_patterns=patterns)
    assert ServeArgs(checkpoint="unused").deny_words == [] and ServeArgs(checkpoint="unused").deny_patterns == []


def test_a_batch_of_other_prompts_gets_a_condition_row_per_image_and_the_images_of_each_alone(text_checkpoint):
    from dtrain.generation import conditions, render
    from dtrain.serving.sampler import condition

    m = loaded(text_checkpoint)
    jobs = [Job(None, (1, 2), "euler", 2, 2.0, prompt="a red circle"),
            Job(None, (3,), "euler", 2, 2.0, prompt="two blue squares", negative_prompt="a green triangle"),
            Job(None, (4,), "euler", 2, 2.0, prompt="")]
    cond, negative = condition(m, jobs)
    enc = lambda *p: conditions(m.cfg, m.tokenizer, list(p))  # noqa: E731
    assert torch.equal(cond, enc("a red circle", "a red circle", "two blue squares", ""))
    assert torch.equal(negative, enc("", "", "a green triangle", ""))  # "" (the null condition) where none given
    assert condition(m, [jobs[0], jobs[2]])[1] is None  # no negative prompt at all: guidance's own null
    together = render(m.net, m.cfg, m.meta, cond, [1, 2, 3, 4], 2, 2.0, negative=negative)
    for i, job in enumerate(jobs):
        c, n = condition(m, [job])
        rows = [k for k, j in enumerate(j for j in jobs for _ in j.seeds) if j is job]
        alone = render(m.net, m.cfg, m.meta, c, list(job.seeds), 2, 2.0, negative=n)
        torch.testing.assert_close(together[rows], alone, atol=1e-5, rtol=1e-5)
    # the prompt and the negative prompt both change the image
    assert not torch.allclose(together[0], render(m.net, m.cfg, m.meta, enc("two blue squares"), [1], 2, 2.0)[0])
    assert not torch.allclose(together[2], render(m.net, m.cfg, m.meta, enc("two blue squares"), [3], 2, 2.0)[0])
    # a class model's rows are its labels
    class_model = SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(conditioning="class")))
    assert torch.equal(condition(class_model, [Job(3, (0, 1), "euler", 1, 1.0)])[0], torch.tensor([3, 3]))


# --- the app in this process -------------------------------------------------------------------

class Remote:
    """A deployment handle's shape (`.options(...)`, `.method.remote(*args)` -> an awaitable with
    cancel()) over an object in this process; the options reach the method as keywords."""

    def __init__(self, target, **options):
        self.target, self.opts = target, options

    def options(self, **options) -> Remote:
        return Remote(self.target, **options)

    def __getattr__(self, name):
        method = getattr(self.target, name)
        return SimpleNamespace(remote=lambda *args, **kw: asyncio.ensure_future(method(*args, **kw, **self.opts)))


class InProcessSampler:
    """The sampler deployment's work for one request in this process: the replica's own model call
    (`render_call`: a condition row per image, or a region job's RegionNet); batching across requests
    is the real-stack test's."""

    def __init__(self, checkpoints: dict, watermark):
        self.loaded = {model_id: loaded(path) for model_id, path in checkpoints.items()}
        self.watermark = watermark

    async def __call__(self, job: Job, multiplexed_model_id: str):
        from dtrain.images import to_uint8
        from dtrain.serving.sampler import render_call

        x = await asyncio.to_thread(render_call, self.loaded[multiplexed_model_id], [job], self.watermark)
        return to_uint8(x)

    async def detect(self, images: torch.Tensor, steps, multiplexed_model_id: str) -> list[dict]:
        from dtrain.watermark import detect, recover_noise

        m = self.loaded[multiplexed_model_id]
        return detect(recover_noise(m.net, m.cfg, images, steps, None, "fp32"), [self.watermark])


class Spy:
    """Calls through to a real metric, and keeps the tags of each call."""

    def __init__(self, metric):
        self.metric, self.tags = metric, []

    def inc(self, value=1.0, tags=None):
        self.tags.append(tags)
        self.metric.inc(value, tags=tags)


@pytest.fixture(scope="module")
def app_client(text_checkpoint, tiny_checkpoint, watermark_key, tmp_path_factory):
    """The app's routes in this process on a real IngressReplica: models "words" (text, the default) and
    "tiny" (class), the deny lists of DENY, a response cache, provenance signing with test credentials, its
    state (jobs, cache) in an SQLite file of its own."""
    from fastapi.testclient import TestClient
    from ray import serve

    from dtrain.provenance import signer_for_serving
    from dtrain.serving.app import app, version_info
    from dtrain.serving.ingress import IngressReplica

    state = tmp_path_factory.mktemp("state") / "state.sqlite"
    args = ServeArgs(models={"words": {"versions": {"v1": str(text_checkpoint)}},
                             "tiny": {"versions": {"ckpt": str(tiny_checkpoint)}}},
                     max_steps=3, max_images=2, max_batch_images=2, cache_entries=64, state_store=f"sqlite://{state}",
                     **DENY).resolved()
    catalog = {n: {v: version_info(n, v, p) for v, p in s.versions.items()} for n, s in args.models.items()}
    sampler = InProcessSampler({f"{n}/{v}": p for n, s in args.models.items() for v, p in s.versions.items()},
                               watermark_key)
    replica = IngressReplica(Remote(sampler), catalog, args, watermark_key.key_id, signer_for_serving(None, None)[0])
    replica.metrics.refusals = Spy(replica.metrics.refusals)
    with pytest.MonkeyPatch.context() as mp, TestClient(app) as client:
        mp.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replica))
        client.replica = replica
        yield client


def pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_a_prompt_generates_signed_images_that_record_it_and_the_cache_keys_on_it(app_client, watermark_key):
    from dtrain.provenance import verify_png

    body = {"prompt": "a red circle", "seed": 5, "num_images": 2, "steps": 2}
    r = app_client.post("/v1/generate", json=body)
    assert r.status_code == 200 and r.headers["x-cache"] == "miss", r.text
    got = r.json()
    assert (got["model"], got["prompt"], got["negative_prompt"], got["class_label"]) == ("words", "a red circle",
                                                                                         None, None)
    assert [pixels(b).shape for b in got["images"]] == [(8, 8), (8, 8)]
    record = verify_png(base64.b64decode(got["images"][1]))["generation"]
    assert (record["prompt"], record["seed"], "class_label" in record, "negative_prompt" in record) == (
        "a red circle", 6, False, False)
    again = app_client.post("/v1/generate", json=body)
    assert again.headers["x-cache"] == "hit" and again.content == r.content
    # another prompt or negative prompt: not the cached answer, other pixels
    first = pixels(got["images"][0])
    for change in ({"prompt": "two blue squares"}, {"negative_prompt": "a green triangle"}):
        other = app_client.post("/v1/generate", json={**body, **change})
        assert other.status_code == 200 and other.headers["x-cache"] == "miss", (change, other.text)
        assert not np.array_equal(pixels(other.json()["images"][0]), first), change
    negative = app_client.post("/v1/generate", json={**body, "negative_prompt": "a green triangle", "seed": 9}).json()
    record = verify_png(base64.b64decode(negative["images"][0]))["generation"]
    assert (record["prompt"], record["negative_prompt"]) == ("a red circle", "a green triangle")
    # the empty negative prompt is guidance's own null condition: the same pixels as none
    empty = app_client.post("/v1/generate", json={**body, "negative_prompt": ""}).json()
    assert np.array_equal(pixels(empty["images"][0]), first)
    # a class model still records its class only
    tiny = app_client.post("/v1/generate", json={"model": "tiny", "class_label": 3, "steps": 1}).json()
    record = verify_png(base64.b64decode(tiny["images"][0]))["generation"]
    assert record["class_label"] == 3 and "prompt" not in record and tiny["prompt"] is None


def test_a_denied_prompt_is_refused_before_any_compute_counted_and_logged_without_it(app_client, caplog):
    log = logging.getLogger("ray.serve")
    log.addHandler(caplog.handler)  # Ray's logger may not propagate to the root
    caplog.set_level(logging.INFO, logger="ray.serve")
    refusals = app_client.replica.metrics.refusals.tags
    seen = len(refusals)
    try:
        for path in ("/v1/generate", "/v1/jobs"):
            for body, field in (({"prompt": "a FORBIDDEN red circle"}, "prompt"),
                                ({"prompt": "a circle", "negative_prompt": "my secrets"}, "negative_prompt"),
                                ({"prompt": "Two  words", "steps": 999}, "prompt")):  # before any other check
                r = app_client.post(path, json=body)
                assert r.status_code == 400, (path, body, r.text)
                assert r.json()["detail"] == {"code": "denied_prompt", "field": field,
                                              "message": f"{field} is refused by this deployment's input policy"}
    finally:
        log.removeHandler(caplog.handler)
    assert refusals[seen:] == [{"reason": "denied_prompt"}] * 6
    lines = [rec.getMessage() for rec in caplog.records if "denied_prompt" in rec.getMessage()]
    assert len(lines) == 6 and "refused: model 'words', prompt by deny_words[0]: denied_prompt" in lines
    assert not any(word in line.lower() for line in lines for word in ("circle", "secrets", "two  words"))


def test_misfits_are_a_422_naming_the_field_on_both_routes(app_client):
    for path in ("/v1/generate", "/v1/jobs"):
        for body, field in (({"class_label": 1}, "class_label"), ({}, "prompt"), ({"negative_prompt": "a"}, "prompt"),
                            ({"prompt": "a" * (MAX_PROMPT_CHARS + 1)}, "prompt"), ({"prompt": "a\x00b"}, "prompt"),
                            ({"prompt": "a", "negative_prompt": "\u202e"}, "negative_prompt"),
                            ({"model": "tiny", "prompt": "a"}, "prompt"), ({"model": "tiny"}, "class_label"),
                            ({"model": "tiny", "class_label": 1, "negative_prompt": ""}, "negative_prompt")):
            r = app_client.post(path, json=body)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (path, body, r.text)


def test_models_say_what_each_is_conditioned_on_and_a_prompted_job_finishes_and_is_detected(app_client):
    listed = {m["model"]: m["versions"][0] for m in app_client.get("/v1/models").json()["models"]}
    words, tiny = listed["words"], listed["tiny"]
    assert (words["conditioning"], words["max_prompt_chars"], words["max_tokens"]) == ("text", MAX_PROMPT_CHARS, 8)
    assert "num_classes" not in words
    assert (tiny["conditioning"], tiny["num_classes"]) == ("class", 10) and "max_tokens" not in tiny
    r = app_client.post("/v1/jobs", json={"prompt": "three big circles", "negative_prompt": "red", "steps": 2})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while (state := app_client.get(f"/v1/jobs/{r.json()['job_id']}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    assert state["state"] == "done", state
    assert (state["result"]["prompt"], state["result"]["negative_prompt"]) == ("three big circles", "red")
    # a text model's image is inverted under the empty prompt (its own is unknown to a detector)
    r = app_client.post("/v1/detect", json={"image": state["result"]["images"][0]})
    assert r.status_code == 200 and r.json()["model"] == "words", r.text  # how well: dtrain.watermark's tests


def test_fuzzed_bodies_of_every_field_never_get_a_server_error(app_client):
    """Every field of the /v1/generate and /v1/jobs body (from the app's OpenAPI schema), fuzzed with
    numbers, NaN, prompts long, short, denied, of control, format, surrogate and any other characters."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fields = list(app_client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"])
    assert {"prompt", "negative_prompt", "class_label"} <= set(fields)
    odd = st.characters(categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs", "So", "Mn"])
    texts = st.one_of(st.text(max_size=12), st.text(odd, max_size=6), st.text(min_size=MAX_PROMPT_CHARS - 2,
                                                                                 max_size=MAX_PROMPT_CHARS + 2),
                      st.sampled_from(CAPTIONS + ["forbidden", "SECRETS", "two words", "", "words", "tiny", "v1",
                                                  "ckpt", "euler", "heun", "flow_map"]))
    values = st.one_of(texts, st.integers(-2**70, 2**70), st.integers(0, 12), st.floats(), st.none(), st.booleans(),
                       st.lists(st.integers(), max_size=2))
    bodies = st.dictionaries(st.one_of(st.sampled_from(fields), st.text(max_size=4)), values, max_size=len(fields))

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, path=st.sampled_from(["/v1/generate", "/v1/jobs"]))
    def check(body, path):
        post_without_server_error(app_client, path, body)

    check()
    for raw, field in ((b'{"prompt": "\\u0000"}', "prompt"), (b'{"prompt": "\\ud800"}', "prompt"),
                       (b'{"prompt": NaN}', "prompt"), (b'{"prompt": "a", "prompt": "\\udfff"}', "prompt"),
                       (b'{"negative_prompt": {"a": 1}, "prompt": "a"}', "negative_prompt")):
        r = app_client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (raw, r.text)
    # a body that is not UTF-8 is FastAPI's own 400 ("error parsing the body"), whatever its fields
    r = app_client.post("/v1/generate", content=b'{"prompt": "\xff"}', headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


# --- the real stack ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def words_served(serve_url, text_checkpoint):
    """One sampler replica of a tiny text model behind Ray Serve (the app "prompts": the deny lists of DENY,
    a response cache), shared by the real-stack tests of prompts and of regions: its base URL."""
    from ray import serve

    from dtrain.serving.app import deploy

    deploy(ServeArgs(models={"words": {"versions": {"v1": str(text_checkpoint)}}}, num_replicas=1, replica_cpus=0.5,
                     max_images=2, batch_wait_timeout_s=0.2, precision="fp32", cache_entries=16, **DENY), "prompts")
    try:
        yield f"{serve_url}/prompts"
    finally:
        serve.delete("prompts")


@pytest.mark.slow
def test_prompts_over_http_on_ray_serve(words_served, text_checkpoint):
    """One sampler replica of a tiny text model behind Ray Serve: prompts (and negative prompts) sent
    together, so batched, each get their own images, the same as sampled alone in this process; a denied
    prompt is a 400, a bad one a 422, and the health probe samples the text model."""
    from dtrain.checkpoint import read_meta
    from dtrain.generation import conditions, render
    from dtrain.images import to_uint8
    from dtrain.watermark import key_for_serving

    bodies = [{"prompt": "a red circle", "seed": 1, "num_images": 2, "steps": 2},
              {"prompt": "two blue squares", "negative_prompt": "a green triangle", "seed": 3, "steps": 2},
              {"prompt": "two blue squares", "seed": 3, "steps": 2}]
    with httpx.Client(base_url=words_served, timeout=60) as c, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: c.post("/v1/generate", json=b), bodies))  # batches wait 0.2 s to fill
        denied = c.post("/v1/generate", json={"prompt": "Forbidden fruit"})
        bad = c.post("/v1/jobs", json={"prompt": "tab\there"})
        health = c.get("/healthz")  # the replica's probe samples the text model with the empty prompt
    m = loaded(text_checkpoint)
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        assert (r.json()["prompt"], r.json()["negative_prompt"]) == (body["prompt"], body.get("negative_prompt"))
        seeds = list(range(body["seed"], body["seed"] + body.get("num_images", 1)))
        neg = body.get("negative_prompt")
        want = to_uint8(render(m.net, m.cfg, read_meta(text_checkpoint),
                               conditions(m.cfg, m.tokenizer, [body["prompt"]] * len(seeds)), seeds, 2, 2.0,
                               watermark=key_for_serving(None),
                               negative=neg and conditions(m.cfg, m.tokenizer, [neg] * len(seeds))))
        got = np.stack([pixels(b) for b in r.json()["images"]]).astype(int)
        assert got.shape == want.shape and np.abs(got - want.astype(int)).max() <= 1, body
    assert answers[1].json()["images"] != answers[2].json()["images"]  # the negative prompt counts
    assert denied.status_code == 400 and denied.json()["detail"]["code"] == "denied_prompt", denied.text
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "prompt"], bad.text
    assert health.status_code == 200 and health.json()["model"] == "words", health.text


@pytest.mark.slow
def test_regions_over_http_on_ray_serve(words_served, text_checkpoint):
    """Region requests (dtrain.regions; the fast tests are tests/test_serving_regions.py) on the prompts'
    deployment: sent together with a plain prompt, so in one batch, each region request runs as its own
    model call and gets the images of render_regions in this process, the plain one those of render;
    the manifest records the regions; the same request again is the cache's bytes, and as a job the same
    pixels; a bad region is a 422 naming its field, a denied word in one a 400."""
    from dtrain.checkpoint import read_meta
    from dtrain.generation import conditions, render
    from dtrain.images import to_uint8
    from dtrain.provenance import verify_png
    from dtrain.regions import render_regions, validate_regions
    from dtrain.watermark import key_for_serving

    scene = {"background": {"prompt": "a red circle"},
             "objects": [{"prompt": "two blue squares", "box": [0.0, 0.0, 0.5, 0.5]},
                         {"prompt": "a green triangle", "box": [0.5, 0.25, 1.0, 1.0]}]}
    bodies = [{"regions": scene, "seed": 2, "num_images": 2, "steps": 2},
              {"regions": scene, "region_method": "attention", "negative_prompt": "three big circles", "seed": 4,
               "steps": 2},
              {"prompt": "a red circle", "seed": 2, "steps": 2}]
    with httpx.Client(base_url=words_served, timeout=60) as c, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: c.post("/v1/generate", json=b), bodies))  # batches wait 0.2 s to fill
        again = c.post("/v1/generate", json=bodies[0])
        job = c.post("/v1/jobs", json=bodies[0]).json()
        deadline = time.monotonic() + 60
        while (state := c.get(f"/v1/jobs/{job['job_id']}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        bad = c.post("/v1/jobs", json={"regions": {**scene, "objects": [*scene["objects"], {
            "prompt": "a", "box": [0.5, 0.5, 0.5, 1.0]}]}})
        denied = c.post("/v1/generate", json={"regions": {**scene, "background": {"prompt": "FORBIDDEN"}}})
    m, meta, key = loaded(text_checkpoint), read_meta(text_checkpoint), key_for_serving(None)
    spec = validate_regions(scene)
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        seeds = list(range(body["seed"], body["seed"] + body.get("num_images", 1)))
        if "regions" in body:
            neg = body.get("negative_prompt")
            want = render_regions(m.net, m.cfg, meta, spec, seeds, 2, 2.0, method=body.get("region_method",
                                  "multidiffusion"), tokenizer=m.tokenizer, negative=neg, watermark=key)
        else:
            want = render(m.net, m.cfg, meta, conditions(m.cfg, m.tokenizer, [body["prompt"]]), seeds, 2, 2.0,
                          watermark=key)
        got = np.stack([pixels(b) for b in r.json()["images"]]).astype(int)
        assert got.shape == to_uint8(want).shape and np.abs(got - to_uint8(want).astype(int)).max() <= 1, body
    first = answers[0].json()
    record = verify_png(base64.b64decode(first["images"][1]))["generation"]
    assert (record["region_method"], record["seed"], record["regions"]["objects"][1]["box"]) == (
        "multidiffusion", 3, {"x0": 0.5, "y0": 0.25, "x1": 1.0, "y1": 1.0})
    assert (first["regions"], first["nfe"]) == (scene, 8) and answers[1].json()["region_method"] == "attention"
    assert again.headers["x-cache"] == "hit" and again.content == answers[0].content
    assert state["state"] == "done" and [pixels(b).tolist() for b in state["result"]["images"]] == [
        pixels(b).tolist() for b in first["images"]], state
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "regions", "objects", 2, "box"], bad.text
    assert denied.status_code == 400 and denied.json()["detail"]["field"] == "regions.background.prompt", denied.text


@pytest.mark.slow
def test_edits_over_http_on_ray_serve(words_served, text_checkpoint):
    """POST /v1/edit on the prompts' deployment (the fast tests are tests/test_serving_edit.py): sent with a
    plain prompt, so in one batch, an edit is a model call of its own and gets the image of
    dtrain.editing.edit in this process with the deployment's watermark; the manifest names the image sent
    as its parent ingredient; the same edit again is the cache's bytes; a bad image is a 422 naming the
    field, a denied word in the target prompt a 400."""
    from dtrain.editing import edit
    from dtrain.generation import conditions
    from dtrain.images import png_bytes, to_uint8
    from dtrain.provenance import verify_png
    from dtrain.watermark import key_for_serving

    source = np.random.default_rng(4).integers(0, 256, (8, 8), dtype=np.uint8)
    body = {"image": base64.b64encode(png_bytes(source)).decode(), "source_prompt": "a red circle",
            "prompt": "a blue circle", "strength": 0.6, "steps": 2}
    with httpx.Client(base_url=words_served, timeout=60) as c, ThreadPoolExecutor(2) as pool:
        edited, plain = pool.map(lambda a: c.post(a[0], json=a[1]), [("/v1/edit", body),
                                                                     ("/v1/generate", {"prompt": "a", "steps": 2})])
        again = c.post("/v1/edit", json=body)
        bad = c.post("/v1/edit", json={**body, "mask": base64.b64encode(png_bytes(source[:7, :7])).decode()})
        denied = c.post("/v1/edit", json={**body, "prompt": "a FORBIDDEN circle"})
    assert edited.status_code == 200 and plain.status_code == 200, (edited.text, plain.text)
    m = loaded(text_checkpoint)
    src, tgt = conditions(m.cfg, m.tokenizer, ["a red circle", "a blue circle"]).chunk(2)
    want = edit(m.net, m.cfg, torch.from_numpy(source).float()[None, None] / 127.5 - 1, src, tgt, 0.6, 2, 2.0,
                watermark=key_for_serving(None))
    got = edited.json()
    assert np.abs(pixels(got["image"]).astype(int) - to_uint8(want.image)[0].astype(int)).max() <= 1
    assert got["nfe"] == want.nfe and got["watermark_key_id"] == key_for_serving(None).key_id
    v = verify_png(base64.b64decode(got["image"]))
    assert v["valid"] and v["ingredients"][0]["relationship"] == "parentOf" and v["generation"]["edit"]["strength"] == 0.6
    assert again.headers["x-cache"] == "hit" and again.content == edited.content
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "mask"], bad.text
    assert denied.status_code == 400 and denied.json()["detail"]["field"] == "prompt", denied.text


def post_without_server_error(client, path: str, body) -> None:
    """POST `body` (any JSON, NaN included) to `path`: the answer is a 2xx or a 4xx, never a 5xx; a job it
    started is cancelled again."""
    r = client.post(path, content=json.dumps(body, allow_nan=True).encode(), headers={"content-type": "application/json"})
    assert r.status_code in (200, 202, 400, 422), (path, body, r.status_code, r.text)
    if r.status_code == 202:  # a valid body started a job: stop it
        assert client.delete(f"/v1/jobs/{r.json()['job_id']}").status_code == 200
