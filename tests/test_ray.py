"""Scale-out on a local Ray instance (2 CPUs): `meissonic generate --prompts-file F --ray` on Ray Data with 2
workers, and `meissonic serve --ray --replicas 2` on Ray Serve, each in its own process as a user runs them."""

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")

from test_serve_clients import free_port  # noqa: E402

KEY = "ray-test-key"


def meissonic(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "meissonic", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_batch_generation_on_ray_data_matches_the_plain_loop_and_skips_finished_images(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    common = ["--prompts-file", prompts, "--model", tiny_folder, "--seed", "5", "--num-images", "2", "--steps", "2"]
    done = meissonic("generate", *common, "--out", tmp_path / "ray", "--ray", "--ray-workers", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    made = sorted(p.name for p in (tmp_path / "ray").glob("*.png"))
    assert len(made) == 6 and "3 to make on 2 worker(s)" in done.stdout
    lines = [json.loads(line) for line in (tmp_path / "ray" / "metadata.jsonl").read_text().splitlines()]
    assert [(m["number"], m["seed"]) for m in lines] == [(0, 5), (0, 6), (1, 7), (1, 8), (2, 9), (2, 10)]
    assert all(m["file"] in made and m["prompt"] for m in lines)
    plain = meissonic("generate", *common, "--out", tmp_path / "plain")
    assert plain.returncode == 0 and sorted(p.name for p in (tmp_path / "plain").glob("*.png")) == made
    for name in made:  # the same seeds; a worker runs on fewer threads, so equal up to float rounding
        a = np.asarray(Image.open(tmp_path / "ray" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "plain" / name)).astype(int)
        assert (np.abs(a - b) > 8).mean() < 0.1, name
    again = meissonic("generate", *common, "--out", tmp_path / "ray", "--ray", "--ray-workers", "2")
    assert again.returncode == 0 and "3 already done, 0 to make" in again.stdout
    assert sorted(p.name for p in (tmp_path / "ray").glob("*.png")) == made
    refused = meissonic("generate", "x", "--model", tiny_folder, "--ray", "--out", tmp_path / "r2")
    assert refused.returncode == 2 and "--ray needs --seed" in refused.stderr


def test_serve_on_ray_runs_two_replicas_behind_one_address(tiny_folder):
    from openai import OpenAI

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "meissonic", "serve", "--ray", "--replicas", "2", "--model",
                                str(tiny_folder), "--port", str(port), "--max-steps", "8"],
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "MEISSONIC_API_KEY": KEY},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        pids, deadline = set(), time.time() + 240
        while time.time() < deadline and len(pids) < 2:
            assert process.poll() is None, process.stdout.read()[-3000:]
            try:
                r = httpx.get(f"{url}/ready", timeout=5)
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert len(pids) == 2, "two replicas should answer behind the one address"
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=2)
        result = client.images.generate(prompt="a star", n=2, size="64x64", extra_body={"steps": 2, "seed": 3})
        assert len(result.data) == 2
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the replicas keep the keys
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
