"""Region control over HTTP (the `regions` and `region_method` fields of /v1/generate and /v1/jobs): the
schema's bounds with the bad field named, planning that checks the regions against the model, the deny
lists on every region, a region request's own model call in the sampler, and the app in this process (the
fixture of tests/test_serving_prompts.py: real ingress, planning, policy, cache, state store, signer and
rendering; only the Serve handles are in-process stand-ins). Regions served by Ray Serve over real HTTP
are tested beside the prompts' deployment, in test_serving_prompts.py, so that the suite starts no other."""
from __future__ import annotations

import base64
import re
import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dtrain.regions import region_nfe, render_regions, validate_regions
from dtrain.serving.config import ServeArgs
from dtrain.serving.planning import Job, PlanError, plan
from dtrain.serving.policy import InputPolicy
from dtrain.serving.schemas import MAX_PROMPT_CHARS, GenerateRequest
from tests import test_serving_prompts as prompts
from tests.test_serving_prompts import CAPTIONS, DENY, loaded, pixels, post_without_server_error

# the prompts' fixtures, each made again for this module: a tiny text checkpoint, renders on one thread,
# and the app in this process
text_checkpoint, one_thread, app_client = prompts.text_checkpoint, prompts.one_thread, prompts.app_client

SCENE = {"background": {"prompt": "a red circle"},
         "objects": [{"prompt": "two blue squares", "box": [0.0, 0.0, 0.5, 0.5]},
                     {"prompt": "a green triangle", "box": [0.5, 0.25, 1.0, 1.0]}]}
DIGITS = {"background": {"class_label": 1}, "objects": [{"class_label": 7, "box": [0.25, 0.25, 0.75, 0.75]}]}
BOX = [0.0, 0.0, 0.5, 0.5]


def obj(prompt: str = "a", box=BOX, **more) -> dict:
    return {"prompt": prompt, "box": box, **more}


def scene(*objects, background=None) -> dict:
    return {"background": {"prompt": "a"} if background is None else background, "objects": list(objects)}


# Bad region bodies and the field each names, in the request's location and at the start of its message.
BAD_REGIONS = [
    (scene(*[obj()] * 9), ("regions", "objects")),  # more than 8 objects
    (scene(obj(), obj(), obj(box=[0.0, 0.0, 1.5, 0.5])), ("regions", "objects", 2, "box")),  # outside the image
    (scene(obj(box=[-0.1, 0.0, 0.5, 0.5])), ("regions", "objects", 0, "box")),
    (scene(obj(box=[0.5, 0.0, 0.5, 1.0])), ("regions", "objects", 0, "box")),  # zero area
    (scene(obj(box=[0.0, 0.6, 1.0, 0.4])), ("regions", "objects", 0, "box")),  # upside down: no area
    (scene(obj(box=[0.0, 0.0, 0.5])), ("regions", "objects", 0, "box")),
    (scene(obj(box=[0, 0, True, 1])), ("regions", "objects", 0, "box")),
    (scene(obj(box=None)), ("regions", "objects", 0, "box")),
    (scene({"prompt": "a"}), ("regions", "objects", 0, "box")),  # an object needs a box
    (scene(obj(bbox=[0, 0, 1, 1])), ("regions", "objects", 0, "bbox")),  # unknown keys
    (scene(obj(boxes=1)), ("regions", "objects", 0, "boxes")),
    ({**scene(), "object": []}, ("regions", "object")),
    (scene(background={"prompt": "a", "box": [0, 0, 1, 1]}), ("regions", "background", "box")),  # its box is the image
    ({"objects": []}, ("regions", "background")),
    (scene(background={}), ("regions", "background", "prompt")),
    (scene(obj(class_label=3)), ("regions", "objects", 0, "prompt")),  # a prompt and a class label
    (scene(obj(prompt=7)), ("regions", "objects", 0, "prompt")),
    (scene(obj(prompt="x" * (MAX_PROMPT_CHARS + 1))), ("regions", "objects", 0, "prompt")),  # the bounds of prompt
    (scene(obj(prompt="tab\there")), ("regions", "objects", 0, "prompt")),
    (scene(obj(prompt="zero\u200bwidth")), ("regions", "objects", 0, "prompt")),
    (scene(background={"class_label": -1}), ("regions", "background", "class_label")),
    (scene(background={"class_label": 10**6}), ("regions", "background", "class_label")),
    (scene(background={"class_label": "7"}), ("regions", "background", "class_label")),
    ({**scene(), "objects": {"prompt": "a"}}, ("regions", "objects")),
    ([SCENE], ("regions",)), ("a red circle", ("regions",)), (7, ("regions",)),
]


def path_of(loc: tuple) -> str:
    """("regions", "objects", 2, "box") -> "regions.objects[2].box", as an error message names it."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if i else p for i, p in enumerate(loc))


# --- the schema, planning and the policy -------------------------------------------------------

def test_regions_are_bounded_and_a_bad_one_is_refused_naming_its_field():
    req = GenerateRequest(regions=SCENE, region_method="attention", negative_prompt="blue")
    assert req.regions == validate_regions(SCENE) and req.region_method == "attention"
    assert req.model_dump()["regions"] == {"background": {"prompt": "a red circle"}, "objects": [
        {"prompt": "two blue squares", "box": [0.0, 0.0, 0.5, 0.5]},
        {"prompt": "a green triangle", "box": [0.5, 0.25, 1.0, 1.0]}]}  # as given: what the record carries
    assert len(GenerateRequest(regions=scene(*[obj()] * 8)).regions.objects) == 8
    assert GenerateRequest(regions=DIGITS).regions.objects[0].class_label == 7
    for bad, loc in BAD_REGIONS:
        with pytest.raises(ValidationError) as e:
            GenerateRequest(regions=bad)
        (err,) = e.value.errors()
        assert err["loc"] == loc and err["msg"].startswith(path_of(loc) + ": "), (bad, err)
        assert "tab\there" not in err["msg"] and "zero\u200bwidth" not in err["msg"]  # never the prompt's text
    with pytest.raises(ValidationError) as e:
        GenerateRequest(regions=SCENE, region_method="cross")
    assert e.value.errors()[0]["loc"] == ("region_method",)


def info(conditioning: str, arch: str = "dit") -> dict:
    """A catalog entry as dtrain.serving.app.version_info makes it (the fields planning reads)."""
    cond = {"num_classes": 10} if conditioning == "class" else {"max_prompt_chars": MAX_PROMPT_CHARS, "max_tokens": 8}
    return {"conditioning": conditioning, **cond, "arch": arch, "flow_map": False,
            "defaults": {"sampler": "euler", "steps": 4, "guidance": 2.0}}


SPECS = {n: ServeArgs(models={n: {"versions": {"v1": f"/c/{n}"}}}).models[n] for n in ("words", "digits", "points")}
CATALOG = {"words": {"v1": info("text")}, "digits": {"v1": info("class")}, "points": {"v1": info("class", "mlp")}}


def planned(**body):
    return plan(GenerateRequest(**body), SPECS, CATALOG, max_steps=10, max_images=4, in_flight=1, draw=lambda: 0.5)


def test_planning_takes_regions_instead_of_a_prompt_or_class_checked_against_the_model():
    p = planned(regions=SCENE, negative_prompt="blue", seed=3, num_images=2)
    spec = validate_regions(SCENE)
    assert p.job == Job(None, (3, 4), "euler", 4, 2.0, negative_prompt="blue", regions=spec,
                        region_method="multidiffusion")
    # the cost of what runs: 3 regions on the conditional side, the unconditional side once
    assert p.job.nfe == region_nfe(spec, "euler", 4, 2.0) == 3 * 4 + 4 and p.job.cost == 2 * 2
    attention = planned(regions=SCENE, region_method="attention", num_images=3).job
    assert (attention.nfe, attention.cost) == (8, 3)  # one call per step, as plain sampling
    assert planned(regions=DIGITS, model="digits").job.regions.objects[0].class_label == 7
    # the response cache keys on the job: other regions, boxes or method are other entries
    jobs = [planned(regions=SCENE).job, planned(regions=SCENE, region_method="attention").job,
            planned(regions=scene(obj())).job, planned(regions=scene(obj(box=[0, 0, 0.5, 0.6]))).job,
            planned(prompt="a").job, planned(regions=scene()).job]
    assert len(set(jobs)) == len(jobs)
    for body, field, msg in (
            ({"regions": SCENE, "prompt": "a"}, "prompt", "give regions or prompt, not both"),
            ({"regions": SCENE, "class_label": 1}, "class_label", "give regions or class_label, not both"),
            ({"model": "digits", "regions": DIGITS, "class_label": 1}, "class_label", "not both"),
            ({"regions": DIGITS}, "regions.background.prompt", "a text model takes prompts, not class labels"),
            ({"regions": scene({"class_label": 2, "box": BOX})}, "regions.objects[0].prompt", "missing"),
            ({"model": "digits", "regions": SCENE}, "regions.background.class_label", "a class model takes class "
                                                                                     "labels"),
            ({"model": "digits", "regions": {**DIGITS, "objects": [{"class_label": 10, "box": BOX}]}},
             "regions.objects[0].class_label", "10 outside 0..9 (digits/v1)"),
            ({"model": "digits", "regions": DIGITS, "region_method": "attention"}, "region_method",
             "needs a text model"),
            ({"model": "digits", "regions": DIGITS, "negative_prompt": "a"}, "negative_prompt", "class-conditional"),
            ({"model": "points", "regions": DIGITS}, "regions", "boxes need an image model"),
            ({"prompt": "a", "region_method": "attention"}, "region_method", "given without regions"),
            ({"regions": SCENE, "steps": 11}, "steps", "must be <= 10")):
        with pytest.raises(PlanError) as e:
            planned(**body)
        assert e.value.field == field and msg in e.value.msg, (body, e.value)


def test_the_deny_lists_reach_every_region_as_they_reach_prompt_and_class_label():
    policy = InputPolicy(**DENY)
    check = lambda **body: policy.check("words", GenerateRequest(**body))  # noqa: E731
    for regions, field, rule in ((scene(background={"prompt": "a FORBIDDEN circle"}), "regions.background.prompt",
                                  "deny_words[0]"),
                                 (scene(obj(), obj("ｆｏｒｂｉｄｄｅｎ")), "regions.objects[1].prompt", "deny_words[0]"),
                                 (scene(obj("all my secrets")), "regions.objects[0].prompt", "deny_patterns[0]"),
                                 (scene(obj("two   words")), "regions.objects[0].prompt", "deny_words[1]")):
        r = check(regions=regions)
        assert (r.code, r.field, r.rule) == ("denied_prompt", field, rule), regions
        assert r.message == f"{field} is refused by this deployment's input policy"
    assert check(regions=SCENE) is None and check(regions=scene(obj("unforbiddenly"))) is None
    # a denied class (DENY: class 6 of every model) in any region, as class_label
    r = check(regions={"background": {"class_label": 1}, "objects": [{"class_label": 6, "box": BOX}]})
    assert (r.code, r.field, r.message) == ("denied_class", "regions.objects[0].class_label",
                                            "class 6 of words is not served")
    assert check(regions={"background": {"class_label": 6}}).field == "regions.background.class_label"
    # the top-level fields first, as before
    assert check(regions=scene(obj("forbidden")), negative_prompt="secret").field == "negative_prompt"


def test_a_region_job_is_a_call_of_its_own_with_the_images_of_render_regions(text_checkpoint):
    from dtrain.generation import conditions, render
    from dtrain.serving.sampler import call_groups, render_call

    m = loaded(text_checkpoint)
    spec = validate_regions(SCENE)
    plain = [Job(None, (1, 2), "euler", 2, 2.0, prompt="a red circle"), Job(None, (3,), "euler", 2, 2.0, prompt="")]
    regional = [Job(None, (4, 5), "euler", 2, 2.0, regions=spec, region_method="multidiffusion"),
                Job(None, (4,), "euler", 2, 2.0, regions=spec, region_method="attention", negative_prompt="blue")]
    jobs = [plain[0], regional[0], plain[1], regional[1], Job(None, (6,), "heun", 2, 2.0, prompt="a")]
    assert call_groups(jobs) == [[0, 2], [1], [3], [4]]  # plain ones share a call per setting; regions alone
    for job in regional:
        negative = job.negative_prompt and conditions(m.cfg, m.tokenizer, [job.negative_prompt] * len(job.seeds))
        want = render_regions(m.net, m.cfg, m.meta, spec, list(job.seeds), 2, 2.0, method=job.region_method,
                              tokenizer=m.tokenizer, negative=negative)
        torch.testing.assert_close(render_call(m, [job]), want, atol=0, rtol=0)
    # and the plain ones beside them are what they are alone
    together = render_call(m, plain)
    alone = render(m.net, m.cfg, m.meta, conditions(m.cfg, m.tokenizer, ["a red circle"] * 2), [1, 2], 2, 2.0)
    torch.testing.assert_close(together[:2], alone, atol=1e-5, rtol=1e-5)
    # the objects change the image: not the background's prompt alone
    background = render(m.net, m.cfg, m.meta, conditions(m.cfg, m.tokenizer, ["a red circle"]), [4], 2, 2.0)
    assert not torch.allclose(render_call(m, [regional[0]])[:1], background)


# --- the app in this process (test_serving_prompts' fixture: "words", text, the default; "tiny", class) -------

def record_of(b64: str) -> dict:
    from dtrain.provenance import verify_png

    return verify_png(base64.b64decode(b64))["generation"]


def finished(client, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (state := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    return state


def test_a_region_request_gives_signed_images_recording_the_regions_the_same_twice_and_by_job(app_client):
    body = {"regions": SCENE, "seed": 5, "num_images": 2, "steps": 2}
    r = app_client.post("/v1/generate", json=body)
    assert r.status_code == 200 and r.headers["x-cache"] == "miss", r.text
    got = r.json()
    data = GenerateRequest(regions=SCENE).model_dump()["regions"]
    assert (got["model"], got["regions"], got["region_method"], got["prompt"], got["class_label"]) == (
        "words", data, "multidiffusion", None, None)
    assert got["nfe"] == region_nfe(validate_regions(SCENE), "euler", 2, 2.0) == 8
    assert [pixels(b).shape for b in got["images"]] == [(8, 8), (8, 8)]
    record = record_of(got["images"][1])
    boxed = {**data, "objects": [{**o, "box": dict(zip(("x0", "y0", "x1", "y1"), o["box"]))} for o in data["objects"]]}
    assert (record["regions"], record["region_method"], record["seed"]) == (boxed, "multidiffusion", 6)
    assert not {"prompt", "class_label", "negative_prompt"} & set(record)
    # the same request: the cache's bytes; the same seed and regions as a job (which no cache answers): the
    # same pixels, computed again
    again = app_client.post("/v1/generate", json=body)
    assert again.headers["x-cache"] == "hit" and again.content == r.content
    job = app_client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    state = finished(app_client, job.json()["job_id"])
    assert state["state"] == "done" and state["result"]["regions"] == data, state
    assert [pixels(b).tolist() for b in state["result"]["images"]] == [pixels(b).tolist() for b in got["images"]]
    # another box, method or negative prompt: not the cached answer, other pixels
    first = pixels(got["images"][0])
    moved = {**SCENE, "objects": [SCENE["objects"][0], {**SCENE["objects"][1], "box": [0.5, 0.0, 1.0, 0.5]}]}
    for change in ({"regions": moved}, {"region_method": "attention"}, {"negative_prompt": "a green triangle"}):
        other = app_client.post("/v1/generate", json={**body, **change})
        assert other.status_code == 200 and other.headers["x-cache"] == "miss", (change, other.text)
        assert not np.array_equal(pixels(other.json()["images"][0]), first), change
    attention = record_of(app_client.post("/v1/generate", json={**body, "region_method": "attention",
                                                                 "negative_prompt": "red"}).json()["images"][0])
    assert (attention["region_method"], attention["negative_prompt"]) == ("attention", "red")
    # a class model's regions: class labels in boxes, multidiffusion
    tiny = app_client.post("/v1/generate", json={"model": "tiny", "regions": DIGITS, "steps": 1})
    assert tiny.status_code == 200, tiny.text
    assert record_of(tiny.json()["images"][0])["regions"] == {"background": {"class_label": 1}, "objects": [
        {"class_label": 7, "box": {"x0": 0.25, "y0": 0.25, "x1": 0.75, "y1": 0.75}}]}


def test_the_record_names_box_corners_as_c2pa_would_turn_an_array_of_numbers_into_bytes():
    from dtrain.images import png_bytes
    from dtrain.provenance import ProvenanceError, signer_for_serving, verify_png

    signer, _ = signer_for_serving(None, None)  # the session's test credentials (conftest)
    png = png_bytes(np.zeros((8, 8), np.uint8))
    for data, path in (({"box": [0.0, 0.5]}, "generation.box"), ({"seeds": [300, 1]}, "generation.seeds"),
                       ({"regions": {"objects": [{"box": [0, 0, 1, 1]}]}}, "generation.regions.objects[0].box")):
        with pytest.raises(ProvenanceError, match=rf"^{re.escape(path)} is an array of numbers"):
            signer.sign_png(png, data)
    kept = {"box": {"x0": 0.0, "y0": 0.5}, "mixed": [0.5, "x"], "none": [], "flags": [True, False]}
    assert verify_png(signer.sign_png(png, kept))["generation"] == kept


def test_bad_region_bodies_are_a_422_naming_the_field_on_both_routes(app_client):
    refusals = app_client.replica.metrics.refusals.tags
    seen = len(refusals)
    cases = [({"regions": bad}, ["body", *loc]) for bad, loc in BAD_REGIONS] + [
        ({"regions": SCENE, "prompt": "a"}, ["body", "prompt"]),
        ({"regions": DIGITS}, ["body", "regions", "background", "prompt"]),  # class labels on a text model
        ({"model": "tiny", "regions": DIGITS, "region_method": "attention"}, ["body", "region_method"]),
        ({"model": "tiny", "regions": {**DIGITS, "objects": [{"class_label": 10, "box": BOX}]}},
         ["body", "regions", "objects", 0, "class_label"]),
        ({"model": "tiny", "regions": SCENE}, ["body", "regions", "background", "class_label"]),
        ({"regions": SCENE, "region_method": "both"}, ["body", "region_method"]),
        ({"prompt": "a", "region_method": "attention"}, ["body", "region_method"])]
    for path in ("/v1/generate", "/v1/jobs"):
        for body, loc in cases:
            r = app_client.post(path, json=body)
            assert r.status_code == 422, (path, body, r.text)
            (err,) = r.json()["detail"]
            assert err["loc"] == loc, (path, body, err)
            if len(loc) > 2:  # a field inside regions is also named at the start of the message
                assert err["msg"].startswith("regions"), err
    assert refusals[seen:] == [{"reason": "invalid"}] * 2 * len(cases)
    r = app_client.post("/v1/generate", json={"model": "tiny", "regions": {**DIGITS, "objects": [
        {"class_label": 1, "box": BOX}, {"class_label": 10, "box": BOX}]}})
    assert r.json()["detail"][0]["msg"].startswith("regions.objects[1].class_label: 10 outside 0..9"), r.text


def test_a_denied_word_in_a_region_gets_the_refusal_of_a_denied_prompt(app_client):
    for path in ("/v1/generate", "/v1/jobs"):
        prompt = app_client.post(path, json={"prompt": "a FORBIDDEN red circle"})
        region = app_client.post(path, json={"regions": scene(obj(), obj("a FORBIDDEN red circle"))})
        assert prompt.status_code == region.status_code == 400, (prompt.text, region.text)
        assert region.json()["detail"] == {**prompt.json()["detail"], "field": "regions.objects[1].prompt",
                                           "message": "regions.objects[1].prompt is refused by this deployment's "
                                                      "input policy"}
        # before any other check, as for prompt
        late = app_client.post(path, json={"regions": scene(obj("my secrets")), "prompt": "a", "steps": 999})
        assert late.status_code == 400 and late.json()["detail"]["code"] == "denied_prompt", late.text
        denied_class = app_client.post(path, json={"model": "tiny", "regions": {**DIGITS, "objects": [
            {"class_label": 6, "box": BOX}]}})
        assert denied_class.status_code == 400 and denied_class.json()["detail"]["code"] == "denied_class"


def test_models_say_which_region_methods_each_version_takes(app_client):
    listed = {m["model"]: m["versions"][0] for m in app_client.get("/v1/models").json()["models"]}
    assert listed["words"]["regions"] == {"methods": ["multidiffusion", "attention"], "max_objects": 8}
    assert listed["tiny"]["regions"] == {"methods": ["multidiffusion"], "max_objects": 8}
    assert listed["words"]["arch"] == listed["tiny"]["arch"] == "dit"
    schema = app_client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert schema["regions"]["anyOf"][0]["properties"]["objects"]["maxItems"] == 8, schema["regions"]


def test_fuzzed_region_bodies_never_get_a_server_error(app_client):
    """Region bodies of every shape: boxes of numbers in and out of the image, NaN, bools, strings, unknown
    keys, prompts and class labels on either model, too many objects, either method."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    numbers = st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 1, 0.5]), st.floats(), st.booleans(),
                        st.integers(-2, 2), st.text(max_size=2))
    boxes = st.one_of(st.lists(numbers, min_size=3, max_size=5), st.none(), numbers)
    prompts = st.one_of(st.sampled_from(["a red circle", "forbidden", "", "two  words", "secret"]), st.text(max_size=6))
    messy = st.fixed_dictionaries({}, optional={  # any mix of fields, values of any type
        "prompt": st.one_of(prompts, st.integers()), "class_label": st.one_of(st.integers(-1, 12), st.none(),
                                                                             st.text(max_size=2)),
        "box": boxes, "bbox": boxes})
    corners = st.lists(st.floats(0, 1), min_size=4, max_size=4).map(  # mostly inside the image, with an area
        lambda b: [min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])])
    objects = st.one_of(st.lists(st.builds(lambda c, b: {**c, "box": b}, messy, boxes), max_size=9), messy)
    anything = st.fixed_dictionaries({"regions": st.one_of(
        st.fixed_dictionaries({"background": messy}, optional={"objects": objects, "extra": st.integers()}),
        st.lists(messy, max_size=2), st.text(max_size=3), st.none())}, optional={
        "model": st.sampled_from(["words", "tiny"]), "region_method": st.sampled_from(["attention", "x"]),
        "negative_prompt": prompts, "steps": st.integers(1, 2)})

    def fitting(model: str):  # regions that fit the model: mostly served, else refused by the deny lists
        captions = st.sampled_from(CAPTIONS * 4 + ["", "forbidden"])
        cond = (st.fixed_dictionaries({"prompt": captions}) if model == "words"
                else st.fixed_dictionaries({"class_label": st.sampled_from([*range(10)] * 2 + [10])}))
        scene = st.fixed_dictionaries({"background": cond, "objects": st.lists(
            st.builds(lambda c, b: {**c, "box": b}, cond, corners), max_size=8)})
        methods = ["multidiffusion", "attention"] if model == "words" else ["multidiffusion"]
        more = {"region_method": st.sampled_from(methods), "steps": st.integers(1, 2), "num_images": st.integers(1, 2),
                "sampler": st.sampled_from(["euler", "heun"]), **({"negative_prompt": captions} if model == "words" else {})}
        return st.fixed_dictionaries({"model": st.just(model), "regions": scene}, optional=more)

    bodies = st.one_of(anything, st.sampled_from(["words", "tiny"]).flatmap(fitting))

    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, path=st.sampled_from(["/v1/generate", "/v1/jobs"]))
    def check(body, path):
        post_without_server_error(app_client, path, body)

    check()
