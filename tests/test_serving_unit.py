"""Serving without Ray: the remote loop driver and the batched replica work against the offline
decoding core, request validation, configs, the CLI and the load tool."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from atspeed_ray.data.prepare import load_prepared
from atspeed_ray.decoding import (
    SearchParams, beam_search, speculative_beam_search, speculative_search,
)
from atspeed_ray.serving.batching import (
    BeamRequest, DraftReply, DraftRequest, VerifyReply, VerifyRequest, beam_batch, draft_batch,
    verify_batch,
)
from atspeed_ray.data.catalog import load_catalog
from atspeed_ray.serving.config import AppArgs, RecommendRequest
from atspeed_ray.serving.driver import DraftUnavailable, RemoteModels, remote_speculative
from atspeed_ray.serving.loadtest import NotLoopback, check_loopback, make_bodies, run_load
from tests.helpers import WIDE_CHILDREN, serving_random_pair

CONFIGS = Path(__file__).resolve().parents[1] / "serve_configs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_unit")
    return (root, *serving_random_pair(root, n_prompts=6))


def test_catalog_prompts_equal_the_prepared_prompts(small):
    root, catalog, *_ = small
    prep = load_prepared(root / "data")
    for hist, prompt in zip(prep.histories("test", 20), prep.prompts("test", 20)):
        assert catalog.prompt(hist) == prompt
    assert catalog.history_window == prep.summary["history_len"]


class Batcher:
    """Collects concurrent calls and answers them with ONE batched call, like @serve.batch."""

    def __init__(self, fn):
        self.fn, self.pending, self.sizes = fn, [], []

    async def __call__(self, req):
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((req, fut))
        await asyncio.sleep(0)  # let the other requests of this tick arrive
        if self.pending:
            items, self.pending = self.pending, []
            self.sizes.append(len(items))
            for (_, f), out in zip(items, self.fn([r for r, _ in items])):
                f.set_result(out)
        return await fut


def test_remote_loop_equals_offline_speculative_and_beam_search(small):
    """Also with children steps (``expand_last``), whose width varies by request: stacked
    into one verify call they are widened to the group's widest."""
    _, catalog, target, draft, prompts = small
    index = catalog.index

    async def run(params):
        prop = Batcher(lambda rs: draft_batch(draft, index, rs))
        ver = Batcher(lambda rs: verify_batch(target, index, rs))
        calls = [{"draft": 0, "target": 0} for _ in prompts]
        outs = await asyncio.gather(*(
            remote_speculative(RemoteModels(prop, ver, calls=c), [p], index, params,
                               dtype=torch.float64)
            for p, c in zip(prompts, calls)))
        return outs, calls, prop.sizes + ver.sizes

    for k, n, gamma, expand in [(5, 10, 3, 0), (3, 3, 2, 0), (5, 10, 3, WIDE_CHILDREN),
                                (3, 3, 1, WIDE_CHILDREN)]:
        params = SearchParams(k, n, gamma, "strict", expand_last=expand)
        outs, calls, sizes = asyncio.run(run(params))
        assert max(sizes) > 1, "concurrent requests must share batched calls"
        ref = beam_search(target, prompts, index, k)
        for b, (out, c) in enumerate(zip(outs, calls)):
            off = speculative_search(target, draft, [prompts[b]], index, params)
            assert out.items[0] == off.items[0] == ref.items[b]
            assert out.stats == off.stats
            torch.testing.assert_close(out.scores[0], ref.scores[b], atol=1e-9, rtol=0)
            assert c["target"] == out.stats["rounds"][0]
            assert 1 <= c["draft"] <= c["target"]  # no draft call once one token is left


def test_remote_relaxed_with_seed_equals_offline(small):
    _, catalog, target, draft, prompts = small
    index = catalog.index

    async def prop(r: DraftRequest) -> DraftReply:
        return draft_batch(draft, index, [r])[0]

    async def ver(r: VerifyRequest) -> VerifyReply:
        return verify_batch(target, index, [r])[0]

    for seed, p in enumerate(prompts[:3]):
        out = asyncio.run(remote_speculative(RemoteModels(prop, ver), [p], index,
                                             SearchParams(5, 10, 3, "relaxed", seed),
                                             dtype=torch.float64))
        off = speculative_beam_search(target, draft, [p], index, 5, draft_beams=10, gamma=3,
                                      mode="relaxed", seed=seed)
        assert out.items == off.items and out.stats == off.stats


def test_remote_relaxed_requests_of_any_seeds_share_draft_batches(small):
    """Concurrent relaxed requests, different seeds (and one seed twice, on other prompts),
    stacked into the same draft and verify calls: each answer is the one its request gets
    offline alone (its rows draw from their own keys, whatever they are stacked with)."""
    _, catalog, target, draft, prompts = small
    index = catalog.index
    seeds = [7, 8, 7, 9, 10, 7]

    async def run():
        prop = Batcher(lambda rs: draft_batch(draft, index, rs))
        ver = Batcher(lambda rs: verify_batch(target, index, rs))
        outs = await asyncio.gather(*(
            remote_speculative(RemoteModels(prop, ver), [p], index,
                               SearchParams(5, 10, 3, "relaxed", s), dtype=torch.float64)
            for p, s in zip(prompts, seeds)))
        return outs, prop.sizes

    outs, sizes = asyncio.run(run())
    assert max(sizes) > 1, "concurrent relaxed requests must share batched draft calls"
    for p, s, out in zip(prompts, seeds, outs):
        off = speculative_beam_search(target, draft, [p], index, 5, draft_beams=10, gamma=3,
                                      mode="relaxed", seed=s)
        assert out.items == off.items and out.stats == off.stats


def test_draft_failure_and_deadline_raise_draft_unavailable(small):
    _, catalog, target, _, prompts = small

    async def broken(_r):
        raise RuntimeError("boom")

    async def slow(_r):
        await asyncio.sleep(5)

    async def ver(r):
        return verify_batch(target, catalog.index, [r])[0]

    for fn, reason in ((broken, "error"), (slow, "deadline")):
        with pytest.raises(DraftUnavailable) as e:
            asyncio.run(remote_speculative(RemoteModels(fn, ver, draft_timeout_s=0.05), prompts[:1],
                                           catalog.index, SearchParams(3, 3, 3, "strict"),
                                           dtype=torch.float64))
        assert e.value.reason == reason


def test_beam_batch_groups_by_k(small):
    _, catalog, target, _, prompts = small
    reqs = [BeamRequest([p], k) for p, k in zip(prompts, [2, 5, 2, 5, 3, 3])]
    for r, out in zip(reqs, beam_batch(target, catalog.index, reqs)):
        ref = beam_search(target, r.prompts, catalog.index, r.k)
        assert out.items == ref.items


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("body,field", [
    ({"history": [], "k": 5}, "history"),
    ({"history": [1] * 51, "k": 5}, "history"),
    ({"history": ["a"], "k": 5}, "history"),
    ({"history": [-1], "k": 5}, "history"),
    ({"history": [1], "k": 0}, "k"),
    ({"history": [1], "k": 51}, "k"),
    ({"history": [1], "k": "3"}, "k"),
    ({"history": [1], "k": 2.5}, "k"),
    ({"history": [1], "k": True}, "k"),
    ({"history": [1], "mode": "fast"}, "mode"),
    ({"history": 3}, "history"),
    ({"k": 3}, "history"),
    ({"history": [1], "extra": 1}, "extra"),
])
def test_request_validation_names_the_field(body, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        RecommendRequest.model_validate_json(__import__("json").dumps(body))
    assert field in {str(x) for err in e.value.errors() for x in err["loc"]}


def test_app_args():
    with pytest.raises(ValueError, match="draft is required"):
        AppArgs(target="t")
    assert AppArgs(target="t", target_only=True).speculative is False
    a = AppArgs(target="t", draft="d", draft_beams_factor=1.5)
    assert (a.draft_width(10), a.draft_width(1), a.draft_width(3)) == (15, 2, 5)
    assert a.model_settings("draft").catalog_model == "t"


# ----------------------------------------------------------------------------- configs, CLI
def test_start_arms_from_a_paired_calibration(monkeypatch):
    """The builder's calibration (``app.start_arms``): per k, beam search and speculation timed
    back to back on each example history; a k starts on the target alone when speculation's
    whole interquartile range loses by the router's margin, on speculation when it wins by it,
    and is left to the warm-up otherwise. Faked pair times: the decision, not the clock."""
    from atspeed_ray import benchmarking
    from atspeed_ray.benchmarking import PairTimes
    from atspeed_ray.serving.app import start_arms
    from tests.helpers import random_catalog

    # per k: one per call (8 histories), then batched (4 calls); k = 1 wins alone, loses batched
    spec_s = {1: ([0.5] * 8, [1.5] * 4), 5: ([3.0] * 8, [3.0] * 4),
              10: ([0.8, 0.9, 1.0, 1.1, 1.2, 0.95, 1.05, 1.0], [0.9, 1.0, 1.1, 1.0])}
    seen: list[int] = []

    def fake_pairs(plain, spec, units, repeat, clock, beside=()):
        alone = units == 8  # 8 calls of one history; 4 of 8 (each k's batched pass follows its alone one)
        k = list(spec_s)[seen.count(8) - (not alone)]
        times = spec_s[k][0 if alone else 1]
        seen.append(units)
        return PairTimes(tuple((1.0,) for _ in range(units)), tuple((s,) for s in times)), [], []

    monkeypatch.setattr(benchmarking, "time_pairs", fake_pairs)
    index = random_catalog(10, [3, 3, 2], seed=0)
    params = {k: SearchParams(k, 2 * k, 3, "strict") for k in spec_s}
    starts = start_arms(None, None, index, [[1, 2]] * 8, params, batch=8)  # type: ignore[arg-type]
    assert seen == [8, 4] * 3
    assert starts == {"alone": {1: "speculative", 5: "target_only"},
                      "batched": {1: "target_only", 5: "target_only"}}
    # batch 1 (the target batches nothing): no batched load to calibrate
    seen.clear()
    assert start_arms(None, None, index, [[1, 2]] * 8, params, batch=1) == {  # type: ignore[arg-type]
        "alone": {1: "speculative", 5: "target_only"}}


def test_route_start_is_checked_and_reaches_the_router():
    from atspeed_ray.serving.routing import Router

    a = AppArgs(target="t", draft="d", data="x", routing="adaptive", route_start={10: "target_only"})
    assert a.route_start == {"alone": {10: "target_only"}, "batched": {10: "target_only"}}  # both loads
    r = Router(start=a.route_start)
    assert r.choose("strict", 10).arm == "target_only" and r.choose("strict", 5).arm == "speculative"
    assert r.choose("strict", 10).load == "batched" and r.choose("strict", 10).arm == "target_only"
    b = AppArgs(target="t", draft="d", data="x", route_start={"batched": {10: "target_only"}})
    assert b.route_start == {"batched": {10: "target_only"}}
    assert Router(start=b.route_start).choose("strict", 10).arm == "speculative"  # alone: warm-up
    for bad in ({10: "draft"}, {0: "target_only"}, {"busy": {10: "target_only"}}):
        with pytest.raises(ValueError, match="route_start"):
            AppArgs(target="t", draft="d", data="x", route_start=bad)


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml"])
def test_configs_parse(name):
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((CONFIGS / name).read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.host == "127.0.0.1"
    app = config.applications[0]
    assert app.import_path == "atspeed_ray.serving.app:build_app"
    AppArgs.model_validate(app.args)
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"Recommender", "DraftModel", "TargetModel"}
    for name_ in ("DraftModel", "TargetModel"):
        assert deps[name_].num_replicas == "auto"
        AutoscalingConfig.model_validate(deps[name_].autoscaling_config)
    if name == "gpu.yaml":
        assert deps["TargetModel"].ray_actor_options.num_gpus == 1
        assert 0 < deps["DraftModel"].ray_actor_options.num_gpus < 1
    else:
        total = sum(deps[n].ray_actor_options.num_cpus * (1 if n == "Recommender" else
                    deps[n].autoscaling_config["max_replicas"]) for n in deps)
        assert total <= 2.0, "local.yaml must fit 2 CPUs when fully scaled out"


def test_cli_serve_resolves_paths(small, capsys):
    from atspeed_ray.cli import main

    root = small[0]
    rc = main(["serve", "--target", str(root / "models/target"), "--draft", str(root / "models/draft"),
               "--data", str(root / "data"), "--port", "8123", "--with-baseline", "--print-config"])
    assert rc == 0
    config = yaml.safe_load(capsys.readouterr().out)
    apps = {a["name"]: a for a in config["applications"]}
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert apps["atspeed"]["args"]["draft"] == str((root / "models/draft").resolve())
    assert apps["atspeed-baseline"]["args"]["target_only"] is True
    assert "DraftModel" not in {d["name"] for d in apps["atspeed-baseline"]["deployments"]}
    assert main(["serve", "--target", str(root / "nope"), "--draft", "x", "--print-config"]) == 2


# ----------------------------------------------------------------------------- load tool
def test_loadtest_refuses_non_loopback(capsys):
    from atspeed_ray.cli import main

    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80/", "http://127.1.2.3"):
        check_loopback(url)
    unspecified = ipaddress.IPv4Address(0)  # the all-interfaces address is not loopback either
    for url in ("http://10.0.0.1:8000", "http://example.com", f"http://{unspecified}:8000", "ftp://127.0.0.1",
                "http://127.0.0.1.example.com"):
        with pytest.raises(NotLoopback):
            check_loopback(url)
    assert main(["loadtest", "--url", "http://192.168.1.1:8000", "--requests", "5"]) == 2
    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--requests", "0"]) == 2
    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--requests", "10000000"]) == 2


def test_run_load_counts_latency_and_errors():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = __import__("json").loads(request.content)
        seen.append(body)
        if body["history"] == [13]:
            return httpx.Response(503, json={"detail": "down"})
        return httpx.Response(200, json={"items": [1, 2], "scores": [0.0, -1.0],
                                         "stats": {"path": "speculative", "rounds": 2, "handle_calls": 4}})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    bodies = make_bodies([[1, 2], [13], [4]], 30, 2, "strict", None)
    res = asyncio.run(run_load("http://127.0.0.1:9", bodies, 4, client=client))
    assert len(seen) == 30 and res.ok == 20 and res.errors == 10
    s = res.summary()
    assert s["server_means"]["handle_calls"] == 4 and s["paths"] == {"speculative": 20}
    assert s["p50_ms"] <= s["p99_ms"]


# ----------------------------------------------------------------------------- defaults
def test_serving_defaults_are_defined_once():
    """The @serve.batch decorators start from BatchSettings' defaults, Router from AppArgs'."""
    from atspeed_ray.serving.config import BatchSettings
    from atspeed_ray.serving.deployments import DraftModel, TargetModel
    from atspeed_ray.serving.routing import Router

    batch = BatchSettings()
    for method in (DraftModel.func_or_class.propose, TargetModel.func_or_class.verify,
                   TargetModel.func_or_class.beam_search):
        assert method._get_max_batch_size() == batch.max_batch_size
        assert method._get_batch_wait_timeout_s() == batch.batch_wait_timeout_s
    fields = AppArgs.model_fields
    router = Router()
    assert router.config.probe_every == fields["probe_every"].default
    assert router.config.max_backoff == fields["probe_backoff"].default


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml"])
def test_configs_write_only_what_they_change(name):
    """A YAML app arg (or batch setting) that repeats its default would silently disagree with
    the code the day the default moves: the configs state only what they change."""
    from atspeed_ray.serving.config import BatchSettings

    args = yaml.safe_load((CONFIGS / name).read_text())["applications"][0]["args"]
    fields = AppArgs.model_fields
    repeated = [key for key, v in args.items()
                if key in fields and not fields[key].is_required() and v == fields[key].default]
    batch_defaults = BatchSettings().model_dump()
    for key in ("target_batch", "draft_batch"):
        repeated += [f"{key}.{k}" for k, v in args.get(key, {}).items() if v == batch_defaults[k]]
    assert not repeated, f"{name} repeats defaults: {repeated}"


# ----------------------------------------------------------------------------- HTTP guards
@pytest.fixture(scope="module")
def guarded():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from atspeed_ray.serving.http import install

    app = FastAPI()
    install(app)

    @app.post("/recommend")
    def recommend(req: RecommendRequest) -> dict:
        return {"k": req.k}

    return TestClient(app)


@pytest.mark.parametrize("raw,field", [
    ('{"history": [1, NaN]}', ["body", "history", 1]),
    ('{"history": [1], "k": Infinity}', ["body", "k"]),
    ('{"history": [-Infinity]}', ["body", "history", 0]),
    ('{"history": [1], "seed": 1e400}', ["body", "seed"]),
    ('{"history": [1], "extra": NaN}', ["body", "extra"]),
])
def test_non_finite_numbers_get_a_422_naming_the_field(guarded, raw, field, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        r = guarded.post("/recommend", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert [d["loc"] for d in r.json()["detail"]] == [field]
    lines = [rec for rec in caplog.records if rec.name == "ray.serve"]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage() and lines[0].exc_info is None


@pytest.mark.parametrize("raw,problem", [
    (b'{"history": [1, 2], "k": "\xff"}', "not valid UTF-8: byte 0xff at position 26"),
    (b'{"history": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "nested too deeply"),
    (b'{"history": [1], "k": ' + b"9" * 5_000 + b"}", "integer too long to read: Exceeds the limit"),
])
def test_unreadable_bodies_get_a_400_that_says_why(guarded, raw, problem):
    """Invalid UTF-8, 30,000-deep nesting, a 5,000-digit integer: a 400 in FastAPI's error
    shape whose message names the problem (FastAPI's own says only "error parsing the body")."""
    r = guarded.post("/recommend", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body"] and problem in detail["msg"], detail
    assert guarded.post("/nowhere", json={}).status_code == 404  # other HTTP errors as before


def test_oversized_bodies_get_a_413_and_422s_echo_little(guarded):
    from atspeed_ray.serving.config import MAX_BODY_BYTES
    from atspeed_ray.serving.http import MAX_ECHO_CHARS

    big = '{"history": [' + ",".join(["1"] * MAX_BODY_BYTES) + "]}"
    r = guarded.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(MAX_BODY_BYTES) in r.json()["detail"]

    def chunks():  # no Content-Length: counted while it streams in
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096].encode()

    r = guarded.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    long = {"history": list(range(5000))}  # within the byte limit, over MAX_HISTORY
    r = guarded.post("/recommend", json=long)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "history"]
    assert len(r.content) < MAX_ECHO_CHARS + 300
    assert guarded.post("/recommend", json={"history": [1, 2]}).json() == {"k": 10}


def test_the_ingress_has_the_guards():
    from fastapi.exceptions import RequestValidationError

    from atspeed_ray.serving.deployments import api
    from atspeed_ray.serving.http import BodyLimit

    assert any(m.cls is BodyLimit for m in api.user_middleware)
    assert RequestValidationError in api.exception_handlers


# ----------------------------------------------------------------------------- bad starts
def test_the_contract_form_needs_no_data_folder(small):
    """The exports carry the item index and prompt format: ``--target T --draft D`` alone serves
    the prompts training built."""
    root, catalog, *_ = small
    bare = load_catalog(None, str(root / "models/target"))
    assert bare.history_window == catalog.history_window
    assert bare.prompt_format == catalog.prompt_format
    for hist in catalog.examples[:8]:
        assert bare.prompt(hist) == catalog.prompt(hist)
    AppArgs(target=str(root / "models/target"), draft=str(root / "models/draft")).check_paths()


def test_bad_paths_are_refused_in_one_line_before_any_replica(small, tmp_path, capsys):
    from atspeed_ray.cli import main
    from atspeed_ray.serving.app import build_app

    root = small[0]
    (tmp_path / "config.json").write_text("{}")  # a model folder without the catalog files
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text('{"draft_kind": "nope"}')
    cases = [({"target": str(tmp_path), "draft": str(root / "models/draft")}, "index.json"),
             ({"target": str(root / "models/target"), "draft": str(tmp_path / "unknown")},
              "unknown draft_kind 'nope'"),
             ({"target": str(root / "models/target"), "draft": str(root / "data")}, "config.json"),
             ({"target": str(root / "models/target"), "draft": str(root / "models/draft"),
               "data": str(tmp_path)}, "not a prepared data folder")]
    # corrupt checkpoints (a truncated weight file, a foreign one, a config that is not JSON):
    # refused from their headers, naming the file, before Ray starts
    for name, corrupt in (("truncated", lambda w: w.write_bytes(w.read_bytes()[:1000])),
                          ("foreign", lambda w: w.write_bytes(b"not a checkpoint")),
                          ("config", lambda w: (w.parent / "config.json").write_text("{oops"))):
        copy = tmp_path / name
        shutil.copytree(root / "models/draft", copy)
        corrupt(copy / "model.safetensors")
        needle = "config.json:1" if name == "config" else "model.safetensors: not a readable safetensors"
        cases.append(({"target": str(root / "models/target"), "draft": str(copy)}, needle))
    for args, needle in cases:
        with pytest.raises(ValueError, match=needle) as e:
            build_app(args)
        assert "\n" not in str(e.value)
        capsys.readouterr()
        rc = main(["serve", *[f"--{k}={v}" for k, v in args.items()], "--print-config"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, err


def test_serve_status_failure_names_the_deployment_and_the_cause():
    from types import SimpleNamespace as NS

    from atspeed_ray.serving.process import failure, running

    tb = ("A replica failed to start with exception. Retrying 2 more time(s). Error:\n"
          "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
          "ray.exceptions.RayTaskError(DataError): ray::ServeReplica...\n"
          "atspeed_ray.data.errors.DataError: /m/index.json: no index.json beside the target model\n")
    dep = {"TargetModel": NS(status="UPDATING", message=tb), "Recommender": NS(status="UPDATING", message="")}
    status = NS(applications={"atspeed": NS(status="DEPLOYING", message="", deployments=dep)})
    assert failure(status) == ("atspeed/TargetModel cannot start: atspeed_ray.data.errors.DataError: "
                               "/m/index.json: no index.json beside the target model")
    assert not running(status)
    from ray.serve._private.common import DeploymentStatus
    from ray.serve.schema import ApplicationStatus

    ok = NS(applications={"atspeed": NS(status=ApplicationStatus.RUNNING, message="", deployments={
        "TargetModel": NS(status=DeploymentStatus.HEALTHY, message="")})})
    assert failure(ok) is None and running(ok)


def test_cli_serve_config_alone_serves_its_own_paths(small, tmp_path, monkeypatch, capsys):
    """``serve --config FILE`` without --target: FILE's paths, relative ones from the current
    folder (as ``serve run FILE`` reads them), made absolute; a bad one refused in one line."""
    from atspeed_ray.cli import main

    root = small[0]
    base = yaml.safe_load((CONFIGS / "local.yaml").read_text())
    base["applications"][0]["args"].update(target="models/target", draft="models/draft", data="data")
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(base))
    monkeypatch.chdir(root)
    assert main(["serve", "--config", str(config), "--print-config"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert args["target"] == str((root / "models/target").resolve()) and args["data"] == str((root / "data").resolve())
    base["applications"][0]["args"]["draft"] = "models/nope"
    config.write_text(yaml.safe_dump(base))
    assert main(["serve", "--config", str(config), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{config}: args.draft models/nope" in err and len(err.splitlines()) == 1, err


# every command that starts or joins Ray, with its required flags (values never read: the
# refusal comes before any work)
RAY_COMMANDS = (["serve", "--target-only", "--target", "t"],
                ["train-target", "--data", "d", "--out", "o"],
                ["align", "--data", "d", "--target", "t", "--out", "o"],
                ["teacher", "--data", "d", "--target", "t", "--out", "o"],
                ["tune", "--data", "d", "--target", "t", "--teacher", "x", "--space", "s",
                 "--num-samples", "1", "--out", "o"])


@pytest.mark.parametrize("argv", RAY_COMMANDS, ids=lambda a: a[0])
def test_commands_refuse_ray_without_auth(argv, monkeypatch, capsys):
    """``RAY_AUTH_MODE=disabled`` (token auth off) is refused at once, exit 2, one line that says
    why and names the opt-in flag; no traceback."""
    from atspeed_ray.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RAY_AUTH_MODE=disabled" in err[0] and "--allow-no-auth" in err[0], err
    assert err[0].startswith(f"atspeed-ray {argv[0]}: error:")


def test_serve_child_and_init_ray_refuse_ray_without_auth(monkeypatch, capsys, tmp_path):
    """The server process of ``serve`` and ``init_ray`` (the Python API, e.g. ``fit``) refuse it
    too; ``--allow-no-auth`` reaches the server process."""
    from atspeed_ray.serving.process import main, server_command
    from atspeed_ray.training.ray_utils import AuthOff, init_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert main([str(tmp_path / "config.yaml"), "http://127.0.0.1:1"]) == 2
    assert "--allow-no-auth" in capsys.readouterr().err
    with pytest.raises(AuthOff, match="RAY_AUTH_MODE=disabled"):
        init_ray()
    assert server_command(tmp_path, "u", None, True)[-1] == "--allow-no-auth"
    assert "--allow-no-auth" not in server_command(tmp_path, "u", 2.0, False)


def test_a_private_instance_starts_its_workers_unniced(monkeypatch):
    """``init_ray`` starts a private instance with ``RAY_worker_niceness=0`` unless the user set
    a niceness; joining a cluster leaves the variable alone."""
    import ray
    from atspeed_ray.training import ray_utils

    seen: list[str | None] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(os.environ.get("RAY_worker_niceness")))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # restored after the test
        monkeypatch.delenv(var, raising=False)
    for user, expected in ((None, "0"), ("5", "5")):
        monkeypatch.delenv("RAY_worker_niceness", raising=False)
        if user is not None:
            monkeypatch.setenv("RAY_worker_niceness", user)
        ray_utils.init_ray()
        assert seen[-1] == expected
    monkeypatch.delenv("RAY_worker_niceness")
    ray_utils.init_ray(address="127.0.0.1:1")
    assert seen[-1] is None


def test_private_token_is_fresh_unless_given(monkeypatch):
    """A private instance gets token auth and a random token of its own; a given one is kept."""
    from atspeed_ray.training.ray_utils import private_token

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    private_token()
    first = os.environ["RAY_AUTH_TOKEN"]
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(first) == 64
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    private_token()
    assert os.environ["RAY_AUTH_TOKEN"] != first
    monkeypatch.setenv("RAY_AUTH_TOKEN", "given")
    private_token()
    assert os.environ["RAY_AUTH_TOKEN"] == "given"


def test_stop_flag_grace_then_refusal(monkeypatch):
    """After the stop, readiness turns at once (``since``); a new request is still answered for
    ``STOP_GRACE_S`` (it was on its way), then refused; the key is read at most every
    ``STOP_CHECK_S``."""
    import time

    from atspeed_ray.serving import stopping

    reads: list[float] = []
    at: list[float | None] = [None]
    monkeypatch.setattr(stopping, "stopped_at", lambda: reads.append(1.0) or at[0])
    flag = stopping.StopFlag()

    async def run() -> None:
        assert await flag.since() is None and not await flag.refuses()
        assert len(reads) == 1  # the second call came within STOP_CHECK_S: no new read
        at[0] = time.time()
        await asyncio.sleep(stopping.STOP_CHECK_S)
        assert await flag.since() == at[0] and not await flag.refuses()
        flag.at = time.time() - stopping.STOP_GRACE_S - 0.1
        assert await flag.refuses()

    asyncio.run(run())
