"""KServe V2 over HTTP for a model replica (`ModelServer` in serve_deployments/model.py), under
/v2/models/NAME: metadata, ready, stats and infer (JSON or binary tensors), each also under
versions/VERSION, and the controller's documents at rollout, rollout/report and monitor.

`KServeRoutes` is mixed into the replica class; it reads the replica's `name`, `kind`,
`num_features`, `lanes`, `champion`, `batching`, `bodies` and `controller`, and answers with its
`_predict`. Every error is a JSON answer (`ApiError`), and no path crashes the replica.

    curl -s http://127.0.0.1:8000/v2/models/digits                # metadata
    curl -s http://127.0.0.1:8000/v2/models/digits/monitor        # the controller's monitoring document
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from serve_deployments.http import error_response, json_response, v2_instances
from serve_deployments.protocol import BINARY_HEADER, ApiError, check_outputs, parse_v2, v2_response

logger = logging.getLogger("ray.serve")


class KServeRoutes:
    """The replica's HTTP surface: Serve calls `__call__` with each request under the route prefix."""

    async def __call__(self, request: Request) -> Response:
        """Serve hands this replica each HTTP request under the route prefix. Six routes do not need a
        web framework: FastAPI's middleware and dependency solving cost about a third of the event
        loop's time per request here (py-spy, benchmarks/serve_load.py at concurrency 32)."""
        try:
            return await self._route(request)
        except ApiError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001 - a bug answers this request with a JSON 500; the replica goes on
            logger.exception("%s: %s %s failed", self.name, request.method, request.scope["path"])
            return error_response(ApiError(500, f"internal error: {type(e).__name__}"))

    async def _route(self, request: Request) -> Response:
        path = request.scope["path"][len(request.scope.get("root_path", "")):].strip("/")
        parts = path.split("/") if path else []
        if parts[:1] == ["rollout"] and len(parts) <= 2:
            return await self._rollout(request, parts[1] if len(parts) == 2 else "")
        if parts == ["monitor"]:
            return await self._monitor(request)
        version = None
        if parts[:1] == ["versions"] and len(parts) >= 2:
            version, parts = parts[1], parts[2:]
        leaf = parts[0] if len(parts) == 1 else ("" if not parts else None)
        allowed = {"": "GET", "ready": "GET", "stats": "GET", "infer": "POST"}.get(leaf) if leaf is not None else None
        if allowed is None or (leaf == "stats" and version is not None):
            raise ApiError(404, f"no route {request.scope['path']!r} for model {self.name} (routes: infer, ready, "
                                "stats, monitor, rollout, rollout/report, versions/VERSION[/infer|/ready])")
        if request.method != allowed:
            raise ApiError(405, f"{request.method} {request.scope['path']}: use {allowed}")
        self._version(version)
        if leaf == "infer":
            return await self.infer(request, version)
        doc = self.metadata() if leaf == "" else {"name": self.name, "ready": True} if leaf == "ready" else \
            {"model_stats": [{"name": self.name, "version": lane.version} | lane.statistics() | self.batching
                             for lane in self.lanes.values()]}
        return json_response(doc)

    async def _rollout(self, request: Request, leaf: str) -> Response:
        """GET rollout: the phase, weight, guards and counts; GET rollout/report: the A/B comparison."""
        if leaf not in ("", "report"):
            raise ApiError(404, f"no route {request.scope['path']!r} for model {self.name} (rollout, rollout/report)")
        if request.method != "GET":
            raise ApiError(405, f"{request.method} {request.scope['path']}: use GET (start and abort a rollout with "
                                "`python -m ray_apps rollout`)")
        if self.controller is None:
            raise ApiError(404, f"model {self.name} is served without a rollout controller")
        call = self.controller.ab_report if leaf else self.controller.status
        try:
            return json_response(await asyncio.wait_for(call.remote(), 30))
        except TimeoutError:
            raise ApiError(503, f"model {self.name}: the rollout controller did not answer; retry shortly") from None

    async def _monitor(self, request: Request) -> Response:
        """GET monitor: each version's drift signals against its reference, live accuracy and volume."""
        if request.method != "GET":
            raise ApiError(405, f"{request.method} {request.scope['path']}: use GET")
        if self.controller is None:
            raise ApiError(404, f"model {self.name} is served without a controller (rollout: null): no monitoring")
        try:
            return json_response(await asyncio.wait_for(self.controller.monitor_status.remote(), 30))
        except TimeoutError:
            raise ApiError(503, f"model {self.name}: the controller did not answer; retry shortly") from None

    def _version(self, version: str | None) -> None:
        if version is not None and version not in self.lanes:
            raise ApiError(404, f"model {self.name} has no version {version!r} here (serving version "
                                f"{', '.join(sorted(self.lanes, key=int))})")

    def metadata(self) -> dict[str, Any]:
        lane = self.champion
        if self.kind == "text":
            inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        else:
            inputs = [{"name": "features", "datatype": "FP32", "shape": [-1, self.num_features]}]
        return {"name": self.name, "versions": [lane.version] + [v for v in self.lanes if v != lane.version],
                "platform": f"rayfoundry_{lane.engine}", "inputs": inputs,
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(lane.labels)]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"labels": lane.labels}}

    async def infer(self, request: Request, version: str | None = None) -> Response:
        req, tensors = parse_v2(await self.bodies.read(request), request.headers.get(BINARY_HEADER))
        check_outputs(req)  # before the engine runs for an answer nobody can have
        instances = v2_instances(self.name, self.kind, self.num_features, tensors)
        body, headers = v2_response(req, await self._predict(instances, "v2", request.headers, version))
        return Response(content=body, headers=headers)
