"""`ModelServer._route` without Ray: the path under /v2/models/NAME decides the route, a wrong version
or an unknown path is a JSON 404 naming it, a wrong method a JSON 405, and no path crashes the replica.

The replica is built with `object.__new__` on the class the Serve deployment wraps, with only the
attributes `_route` reads; `infer` and `statistics` are stubs (no engine, no body read).

Run: .venv/bin/python -m pytest tests/unit/test_serve_routes.py -q
"""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from serve_deployments.http import json_response
from serve_deployments.model import ModelServer
from serve_deployments.protocol import ApiError
from serve_deployments.rollout import Plan

PREFIX = "/v2/models/digits"


class Stubbed(ModelServer.func_or_class):
    """The replica class with an `infer` that records instead of touching an engine."""

    async def infer(self, request: Request, version: str | None = None):
        self.inferred.append(request.scope["path"])
        return json_response({"stub": "infer"})


class StubLane:
    """A served version without an engine."""

    version, engine, labels = "3", "onnx", ["0", "1"]

    def statistics(self) -> dict:
        return {"inference_count": 7}


def _server() -> Stubbed:
    server = object.__new__(Stubbed)
    server.name, server.kind, server.num_features = "digits", "image", 64
    server.lanes, server.plan, server.batching, server.controller = {"3": StubLane()}, Plan(champion="3"), {}, None
    server.inferred = []
    return server


def _request(path: str, method: str = "GET") -> Request:
    return Request({"type": "http", "method": method, "path": path, "root_path": PREFIX, "headers": [],
                    "query_string": b""})


def _call(server: Stubbed, path: str, method: str = "GET") -> tuple[int, dict]:
    """What the replica answers (`__call__`, which turns `_route`'s ApiError into JSON)."""
    response = asyncio.run(server(_request(path, method)))
    assert response.media_type == "application/json"
    return response.status_code, json.loads(response.body)


@pytest.mark.parametrize("path", [PREFIX, PREFIX + "/", PREFIX + "/versions/3", PREFIX + "/versions/3/"])
def test_metadata_at_the_prefix_and_its_version(path):
    status, doc = _call(_server(), path)
    assert status == 200, doc
    assert doc["name"] == "digits" and doc["versions"] == ["3"] and doc["platform"] == "rayfoundry_onnx"
    assert doc["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}]


@pytest.mark.parametrize("path", [PREFIX + "/ready", PREFIX + "/ready/", PREFIX + "/versions/3/ready"])
def test_ready(path):
    assert _call(_server(), path) == (200, {"name": "digits", "ready": True})


def test_stats():
    status, doc = _call(_server(), PREFIX + "/stats")
    assert status == 200
    assert doc == {"model_stats": [{"name": "digits", "version": "3", "inference_count": 7}]}


@pytest.mark.parametrize("path", [PREFIX + "/infer", PREFIX + "/infer/", PREFIX + "/versions/3/infer"])
def test_infer_with_post_reaches_infer(path):
    server = _server()
    assert _call(server, path, "POST") == (200, {"stub": "infer"})
    assert server.inferred == [path]


@pytest.mark.parametrize("path, method, use", [
    (PREFIX + "/infer", "GET", "POST"),
    (PREFIX + "/versions/3/infer", "GET", "POST"),
    (PREFIX + "/ready", "POST", "GET"),
    (PREFIX, "POST", "GET"),
    (PREFIX + "/infer", "HEAD", "POST"),
    (PREFIX + "/stats", "OPTIONS", "GET"),
])
def test_wrong_method_is_a_json_405(path, method, use):
    server = _server()
    status, doc = _call(server, path, method)
    assert status == 405
    assert doc == {"error": f"{method} {path}: use {use}"}
    assert server.inferred == []


@pytest.mark.parametrize("version", ["4", "03", "..", "3.0"])
@pytest.mark.parametrize("leaf, method", [("", "GET"), ("/ready", "GET"), ("/infer", "POST")])
def test_wrong_version_is_a_json_404_naming_it(version, leaf, method):
    server = _server()
    status, doc = _call(server, f"{PREFIX}/versions/{version}{leaf}", method)
    assert status == 404
    assert doc == {"error": f"model digits has no version {version!r} here (serving version 3)"}
    assert server.inferred == []  # checked before the body is read


@pytest.mark.parametrize("rest", [
    "/predict", "/metadata", "/inferx", "/infer/extra", "/ready/infer",
    "/versions", "/versions/", "/versions/3/stats", "/versions/4/stats", "/versions/3/extra", "/versions/3/infer/x",
    "/../infer", "/versions/../infer/..", "/x/../infer", "/versions/3/../infer", "/../../digits/infer",
    "/versions//3/infer", "/versions/3//infer", "/./infer", "/ínfer", "/infer\x00", "/" + "a/" * 2000 + "infer",
])
def test_unknown_paths_are_a_json_404_not_a_crash(rest):
    server = _server()
    path = PREFIX + rest
    for method in ("GET", "POST"):
        status, doc = _call(server, path, method)
        assert status == 404, (method, doc)
        assert doc["error"].startswith(f"no route {path!r} for model digits (routes: infer, ready, stats, "[:500])
        assert len(doc["error"]) <= 520  # a long path is not echoed whole
    assert server.inferred == []


@pytest.mark.parametrize("path, leaf", [(PREFIX + "//infer", "infer"), (PREFIX + "///ready//", "ready")])
def test_extra_slashes_at_the_ends_are_ignored(path, leaf):
    server = _server()
    status, _ = _call(server, path, "POST" if leaf == "infer" else "GET")
    assert status == 200 and server.inferred == ([path] if leaf == "infer" else [])


def test_route_raises_api_errors_that_call_turns_into_json():
    server = _server()
    with pytest.raises(ApiError) as err:
        asyncio.run(server._route(_request(PREFIX + "/versions/3/stats")))
    assert err.value.status == 404 and "versions/VERSION[/infer|/ready]" in err.value.message
    with pytest.raises(ApiError) as err:
        asyncio.run(server._route(_request(PREFIX + "/infer", "GET")))
    assert err.value.status == 405
    response = asyncio.run(server._route(_request(PREFIX + "/infer", "POST")))
    assert response.status_code == 200 and server.inferred == [PREFIX + "/infer"]
