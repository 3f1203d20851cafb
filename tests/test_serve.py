"""`meissonic serve` (meissonic.serving): the OpenAI and AUTOMATIC1111 APIs over one batching worker, in process
(FastAPI's TestClient) for the API shapes, limits, keys and errors; the real clients against a server in its own
process are in test_serve_clients.py."""

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from meissonic.pipeline import MeissonicPipeline
from meissonic.serving.app import api_keys, build_app, is_loopback, key_matches
from meissonic.sizes import SizePolicy
from meissonic.serving.engine import Engine, Job, JobError, Limits, QueueFull

KEY = "test-key-1"


def load_tiny(folder):
    def load():
        pipe = MeissonicPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        pipe.size_policy = SizePolicy(allow_large=False, check_memory=True)  # as `meissonic serve` loads it
        return pipe
    return load


@pytest.fixture(scope="module")
def engine(tiny_folder):
    engine = Engine(load_tiny(tiny_folder), "tiny", max_batch=4, max_queue=8,
                    limits=Limits(max_images=4, max_steps=8, max_pixels=512 * 512, max_body_bytes=2_000_000)).start()
    engine.loaded.wait(120)
    assert engine.ready, engine.error
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(build_app(engine, [KEY, "second-key"]), raise_server_exceptions=False,
                      headers={"Authorization": f"Bearer {KEY}"})


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def picture(size=(128, 128), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- OpenAI


def test_openai_generation_returns_b64_pngs_with_the_clis_metadata(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "size": "auto", "seed": 5,
                                                     "steps": 3, "model": "dall-e-3", "quality": "auto",
                                                     "background": "auto", "output_format": "png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2 and body["size"] == "128x128"
    images = [png(d["b64_json"]) for d in body["data"]]
    assert all(im.size == (128, 128) for im in images) and body["data"][0]["revised_prompt"] == "a red circle"
    params = [json.loads(im.info["parameters"]) for im in images]
    assert [p["seed"] for p in params] == [5, 6] and params[0]["steps"] == 3 and params[0]["prompt"] == "a red circle"
    assert params[0]["model"] == "tiny" and params[0]["speed"] == "exact" and "meissonic_version" in params[0]
    again = client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 6, "steps": 3})
    alone = np.asarray(png(again.json()["data"][0]["b64_json"])).astype(int)
    # seed + i: image 1 of the pair is the image of seed 6 alone, to the float rounding of a batch of 2 against 1
    print("differing pixels", (np.abs(alone - np.asarray(images[1]).astype(int)) > 8).mean())
    assert (np.abs(alone - np.asarray(images[1]).astype(int)) > 8).mean() < 0.1


def test_openai_quality_picks_the_speed_and_url_gives_a_data_url(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "quality": "low", "response_format": "url",
                                                     "output_format": "jpeg", "size": "64x64", "steps": 4})
    assert r.status_code == 200, r.text
    entry = r.json()["data"][0]
    assert entry["url"].startswith("data:image/jpeg;base64,") and "b64_json" not in entry
    image = png(entry["url"].split(",", 1)[1])
    assert image.format == "JPEG" and image.size == (64, 64)


@pytest.mark.parametrize("body, status, param", [
    ({}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "size": "100x100"}, 400, "size"),  # not a multiple of the patch
    ({"prompt": "x", "size": "4096x4096"}, 400, "size"),  # beyond the size rule
    ({"prompt": "x", "n": 5}, 400, "n"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "steps": 9}, 400, "steps"),
    ({"prompt": "x", "quality": "ultra"}, 400, "quality"),
    ({"prompt": "x", "speed": "warp"}, 400, "speed"),
    ({"prompt": "x", "response_format": "gif"}, 400, "response_format"),
    ({"prompt": "x", "stream": True}, 400, "stream"),
    ({"prompt": "x", "guidance_scale": 1e9}, 400, "guidance_scale"),
    ({"prompt": "x", "seed": 2**70}, 400, "seed"),
    ([1, 2], 400, None),
])
def test_openai_errors_are_json_in_openais_shape(client, body, status, param):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and r.headers["x-should-retry"] == "false"
    if param is not None:
        assert error["param"] == param, error


def test_openai_edit_inpaints_the_transparent_area_and_keeps_the_rest(client):
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 64, 128))  # the left half transparent: edit it
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    r = client.post("/v1/images/edits", data={"prompt": "a blue square", "n": "1", "seed": "3", "steps": "3"},
                    files=[("image[]", ("in.png", picture(), "image/png")),
                           ("mask", ("mask.png", buffer.getvalue(), "image/png"))])
    assert r.status_code == 200, r.text
    out = np.asarray(png(r.json()["data"][0]["b64_json"]).convert("RGB")).astype(int)
    assert out.shape == (128, 128, 3)
    assert (np.abs(out[:, 96:] - [200, 30, 30]) <= 2).all()  # kept pixels are the input's (past the feather)
    assert json.loads(png(r.json()["data"][0]["b64_json"]).info["parameters"])["task"] == "inpaint"


def test_openai_edit_without_mask_redraws_and_with_strength_is_image_to_image(client):
    r = client.post("/v1/images/edits", data={"prompt": "x", "steps": "2"},
                    files={"image": ("in.png", picture(), "image/png")})
    params = json.loads(png(r.json()["data"][0]["b64_json"]).info["parameters"])
    assert r.status_code == 200 and params["task"] == "img2img" and params["strength"] == 1.0
    r = client.post("/v1/images/edits", data={"prompt": "x", "steps": "2", "strength": "0.5"},
                    files={"image": ("in.png", picture(), "image/png")})
    params = json.loads(png(r.json()["data"][0]["b64_json"]).info["parameters"])
    assert params["task"] == "img2img" and params["strength"] == 0.5


@pytest.mark.parametrize("data, files, param", [
    ({"prompt": "x"}, {}, "image"),
    ({}, {"image": ("a.png", picture(), "image/png")}, "prompt"),
    ({"prompt": "x"}, {"image": ("a.png", b"not an image", "image/png")}, "image"),
    ({"prompt": "x"}, {"image": ("a.png", picture((600, 600)), "image/png")}, "image"),  # beyond max_pixels
    ({"prompt": "x"}, {"image": ("a.png", picture(), "image/png"), "mask": ("m.png", picture(), "image/png")}, "mask"),
    ({"prompt": "x", "n": "two"}, {"image": ("a.png", picture(), "image/png")}, "n"),
    ({"prompt": "x", "strength": "1.5"}, {"image": ("a.png", picture(), "image/png")}, "strength"),
])
def test_openai_edit_errors_name_the_field(client, data, files, param):
    r = client.post("/v1/images/edits", data=data, files=files)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_models_lists_the_served_model(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


# ---------------------------------------------------------------------------------------------- AUTOMATIC1111


def test_a1111_txt2img_returns_images_parameters_and_info(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a star", "negative_prompt": "blur", "seed": 11,
                                                "steps": 2, "cfg_scale": 3, "width": 64, "height": 128,
                                                "batch_size": 2, "n_iter": 1, "sampler_name": "Euler a",
                                                "override_settings": {}, "restore_faces": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and png(body["images"][0]).size == (64, 128)
    info = json.loads(body["info"])
    assert info["seed"] == 11 and info["all_seeds"] == [11, 12] and info["width"] == 64 and info["cfg_scale"] == 3
    assert "Seed: 11" in info["infotexts"][0] and "Negative prompt: blur" in info["infotexts"][0]
    assert body["parameters"]["sampler_name"] == "Euler a"  # the request, echoed


def test_a1111_img2img_inpaints_under_a_white_mask_and_inverts_it(client):
    image = base64.b64encode(picture()).decode()
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    for invert, kept in ((0, slice(96, None)), (1, slice(None, 32))):
        r = client.post("/sdapi/v1/img2img", json={
            "prompt": "x", "steps": 2, "seed": 1, "init_images": [f"data:image/png;base64,{image}"],
            "mask": base64.b64encode(buffer.getvalue()).decode(), "inpainting_mask_invert": invert})
        assert r.status_code == 200, r.text
        out = np.asarray(png(r.json()["images"][0]).convert("RGB")).astype(int)
        assert (np.abs(out[:, kept] - [200, 30, 30]) <= 2).all()
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "init_images": [image],
                                                "denoising_strength": 0.4})
    assert r.status_code == 200 and json.loads(png(r.json()["images"][0]).info["parameters"])["strength"] == 0.4


def test_a1111_models_and_options(client):
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"})
    assert r.status_code == 400 and "serves one model" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["%%%"]})
    assert r.status_code == 400 and set(r.json()) == {"error", "detail", "errors"}


# ---------------------------------------------------------------------------------------------- keys, limits


def test_keys_are_required_except_for_health_and_several_are_accepted(engine):
    bare = TestClient(build_app(engine, [KEY, "second-key"]), raise_server_exceptions=False)
    assert bare.get("/health").json() == {"status": "ok"} and bare.get("/ready").status_code == 200
    r = bare.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert bare.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert bare.get("/v1/models", headers={"Authorization": "Bearer second-key"}).status_code == 200
    basic = base64.b64encode(b"user:" + KEY.encode()).decode()
    assert bare.get("/sdapi/v1/sd-models", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert bare.get("/sdapi/v1/sd-models").status_code == 401
    assert key_matches("a", ["b", "a"]) and not key_matches("a", ["b"]) and not key_matches("a", [])


def test_a_body_over_the_limit_gets_413_and_unknown_paths_json(client):
    r = client.post("/v1/images/generations", content=b"{" + b" " * 2_100_000 + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert client.post("/v1/images/generations", content=b"{oops", headers={"content-type":
                                                                           "application/json"}).status_code == 400
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "http://x"}).headers


def test_keys_come_from_the_flag_and_the_environment(monkeypatch):
    monkeypatch.setenv("MEISSONIC_API_KEY", "e1, e2,")
    assert api_keys(["f1", "e1"]) == ["f1", "e1", "e2"]
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_ready_is_503_until_the_model_has_loaded_and_requests_wait_for_it(tiny_folder):
    gate = threading.Event()

    def slow():
        gate.wait(60)
        return load_tiny(tiny_folder)()

    engine = Engine(slow, "tiny").start()
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    assert client.get("/ready").status_code == 503 and client.get("/health").status_code == 200
    r = client.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    gate.set()
    engine.loaded.wait(60)
    assert client.get("/ready").json()["status"] == "ready"
    broken = Engine(lambda: 1 / 0, "broken").start()
    broken.loaded.wait(10)
    assert TestClient(build_app(broken)).get("/ready").json() == {"status": "failed",
                                                                  "error": "ZeroDivisionError: division by zero"}
    engine.close()


# ---------------------------------------------------------------------------------------------- the worker


def test_the_worker_batches_compatible_jobs_up_to_max_batch_and_edits_alone():
    engine = Engine(lambda: None, "none", max_batch=4)
    a, b, c = (Job("a", n=2, width=64, height=64, steps=4), Job("b", n=1, width=64, height=64, steps=4),
               Job("c", n=2, width=64, height=64, steps=4))
    other = Job("d", n=1, width=128, height=64, steps=4)
    edit = Job("e", image=Image.new("RGB", (64, 64)), strength=0.5, width=64, height=64, steps=4)
    engine.pending.extend([a, other, b, edit, c])
    assert engine._take() == [a, b]  # c would make 5 images
    assert engine._take() == [other] and engine._take() == [edit] and engine._take() == [c]


def test_a_full_queue_answers_429_with_retry_after(tiny_folder):
    gate = threading.Event()
    engine = Engine(lambda: gate.wait(60) and load_tiny(tiny_folder)(), "tiny", max_queue=2)
    engine.pipe = object()  # checks pass through the stub below; the worker never starts
    engine.check = lambda job: job
    client = TestClient(build_app(engine), raise_server_exceptions=False)
    engine.submit(Job("a"))
    engine.submit(Job("b"))
    with pytest.raises(QueueFull):
        engine.submit(Job("c"))
    r = client.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "x-should-retry" not in r.headers
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_concurrent_requests_run_in_one_batch_with_each_images_own_seed(engine, client):
    """Requests that arrive while the worker is busy wait together, and compatible ones share a pipeline call."""
    before = len(engine.batches)
    with engine.cond:  # hold the worker back until all three are queued
        futures = [engine.submit(engine.check(Job("a shape", n=1, seed=s, steps=2, width=64, height=64)))
                   for s in (1, 2, 3)]
    made = [f.result(120) for f in futures]
    assert engine.batches[before:] == [3]
    assert [m.seeds for m in made] == [[1], [2], [3]]


def test_a_failed_generation_is_a_500_without_a_traceback(engine, client, monkeypatch):
    def boom(batch):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "_generate", boom)
    r = client.post("/v1/images/generations", json={"prompt": "x", "steps": 1})
    assert r.status_code == 500 and r.headers["x-should-retry"] == "false"
    assert "secret" not in r.text and "Traceback" not in r.text and r.json()["error"]["type"] == "server_error"


def test_job_errors_name_their_field(engine):
    with pytest.raises(JobError) as info:
        engine.check(Job("x", n=9))
    assert info.value.param == "n"
    with pytest.raises(JobError, match="same size"):
        engine.check(Job("x", image=Image.new("RGB", (64, 64)), mask=np.ones((32, 32), bool)))
    job = engine.check(Job("x", image=Image.new("RGB", (70, 50)), strength=0.3))
    assert (job.width, job.height) == (64, 48) and torch.is_tensor(torch.tensor(job.seed))


# ---------------------------------------------------------------------------------------------- fuzzing

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                               max_size=4), max_leaves=8)
FIELDS = ["prompt", "n", "size", "seed", "steps", "guidance_scale", "quality", "response_format", "output_format",
          "speed", "negative_prompt", "cfg_scale", "width", "height", "batch_size", "n_iter", "init_images", "mask",
          "denoising_strength", "inpainting_mask_invert", "stream", "output_compression", "strength"]
SMALL = st.one_of(st.sampled_from(["x", "auto", "64x64", "128x64", "0x0", "low", "url", "png", "fast", "", "-1"]),
                  st.integers(-3, 9), st.floats(-2, 12, allow_nan=False), st.none(), st.booleans(), JSON)
PATHS = ["/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options",
         "/v1/images/edits"]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def answered_in_json(r) -> None:
    """A 2xx, or a 4xx in the API's JSON error shape (the model is loaded: no 503)."""
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    if r.status_code >= 400:
        error = body["error"]  # OpenAI: {"error": {"message", ...}}; AUTOMATIC1111: {"error", "detail", ...}
        assert error["message"] if isinstance(error, dict) else body["detail"]


@FUZZ
@given(path=st.sampled_from(PATHS), body=st.one_of(JSON, st.dictionaries(st.sampled_from(FIELDS), SMALL,
                                                                          max_size=6)))
def test_fuzzed_json_bodies_get_a_2xx_or_a_json_4xx(client, path, body):
    answered_in_json(client.post(path, json=body))
    assert client.get("/health").status_code == 200


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=12), max_size=5),
       image=st.one_of(st.binary(max_size=200), st.just(picture((64, 64))), st.none()),
       mask=st.one_of(st.binary(max_size=100), st.just(picture((64, 64))), st.none()),
       name=st.sampled_from(["image", "image[]", "other"]))
def test_fuzzed_multipart_uploads_get_a_2xx_or_a_json_4xx(client, fields, image, mask, name):
    files = [(name, ("a.png", image, "image/png"))] if image is not None else []
    if mask is not None:
        files.append(("mask", ("m.png", mask, "image/png")))
    answered_in_json(client.post("/v1/images/edits", data=fields, files=files or None))
    assert client.get("/health").status_code == 200
