"""Request and response formats: `/v1` predict and the KServe V2 Open Inference Protocol.

V2 requests come as plain JSON or with Triton's binary-data extension (what tritonclient sends by
default): the `Inference-Header-Content-Length` header gives the length of a JSON header, and the
raw tensors follow it in input order, each `parameters.binary_data_size` bytes long. BYTES elements
are a 4-byte little-endian length and the bytes. Responses are binary the same way when the request
asks for it (`outputs[].parameters.binary_data` or `parameters.binary_data_output`).
Every problem raises `ApiError(status, message)`; the message names the field at fault.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from monitoring.monitor import FeedbackLabel
from rayfoundry.errors import describe_validation_error

BINARY_HEADER = "inference-header-content-length"
MAX_DIMS = 8  # our models take [N], [N, 1], [N, F] or [N, 8, 8]; numpy itself stops at 64
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


MAX_MESSAGE = 500  # characters of an error message: it may echo client input (names, shapes, paths)
MAX_DIM = 1 << 31  # one dimension of a V2 shape at most; even an empty tensor's shape must be real


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "... (cut)"
        super().__init__(message)
        self.status, self.message = status, message


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_json(body: bytes, what: str = "request body") -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"{what} is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, f"{what}: JSON nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"{what}: invalid JSON: {e}") from None


Number = StrictFloat | StrictInt


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[StrictStr | list[Number] | list[list[Number]]] = Field(min_length=1)


def v1_instances(payload: Any) -> list[Any]:
    try:
        return PredictRequest.model_validate(payload).instances
    except ValidationError as e:
        raise ApiError(422, describe_validation_error(e)) from None


MAX_FEEDBACK = 1000  # labels per feedback request


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: StrictStr = Field(pattern=r"^[0-9a-f]{32}$", description="The answer's request_id.")
    label: StrictStr | StrictInt = Field(description="The true label: its name, or its index.")
    instance: StrictInt = Field(0, ge=0, le=1_000_000, description="Which instance of the request (0: the first).")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    feedback: list[FeedbackItem] = Field(min_length=1, max_length=MAX_FEEDBACK)


def feedback_items(payload: Any, model: str, labels: list[str]) -> list[FeedbackLabel]:
    """`{"request_id", "label"[, "instance"]}` or `{"feedback": [...]}` as checked labels (index form); a bad
    item is a 422 naming it."""
    if isinstance(payload, dict) and "request_id" in payload:
        payload = {"feedback": [payload]}
    try:
        items = FeedbackRequest.model_validate(payload).feedback
    except ValidationError as e:
        raise ApiError(422, describe_validation_error(e)) from None
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for i, item in enumerate(items):
        label = index.get(item.label) if isinstance(item.label, str) else item.label
        if label is None or not 0 <= label < len(labels):
            raise ApiError(422, f"feedback[{i}].label: {item.label!r} is not a label of model {model} (labels: "
                                f"{', '.join(labels[:20])}, or their index 0..{len(labels) - 1})")
        out.append(FeedbackLabel(request_id=item.request_id, instance=item.instance, label=label))
    return out


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2Output(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr
    parameters: dict[str, Any] | None = None


class V2Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2Output] | None = None


def _unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ApiError(400, f"inputs.{name}: truncated BYTES element length at byte {pos}")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise ApiError(400, f"inputs.{name}: BYTES element of {n} bytes runs past the tensor's data")
        out.append(raw[pos + 4: pos + 4 + n])
        pos += 4 + n
    return out


def parse_v2(body: bytes, header_length: str | None) -> tuple[V2Request, dict[str, np.ndarray]]:
    """The request and each input tensor as numpy (BYTES as an object array of str)."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ApiError(400, f"Inference-Header-Content-Length: not an integer: {header_length[:40]!r}") from None
        if not 0 < n <= len(body):
            raise ApiError(400, f"Inference-Header-Content-Length {n} is outside the {len(body)}-byte body")
        body, binary = body[:n], body[n:]
    try:
        req = V2Request.model_validate(parse_json(body, "inference request"))
    except ValidationError as e:
        raise ApiError(422, describe_validation_error(e)) from None
    tensors, offset = {}, 0
    for t in req.inputs:
        if len(t.shape) > MAX_DIMS:
            raise ApiError(422, f"inputs.{t.name}.shape: {len(t.shape)} dimensions; at most {MAX_DIMS}")
        if any(d < 0 for d in t.shape):
            raise ApiError(422, f"inputs.{t.name}.shape: negative dimension in {t.shape[:MAX_DIMS]}")
        if any(d > MAX_DIM for d in t.shape):  # [0, 2**70] holds no values, but numpy cannot shape it
            raise ApiError(422, f"inputs.{t.name}.shape: a dimension above {MAX_DIM}")
        count = math.prod(t.shape)  # exact: a product past int64 is just a number the data cannot match
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):  # bool is an int subclass
                raise ApiError(400, f"inputs.{t.name}: binary_data_size {size!r} does not fit the "
                                    f"{len(binary) - offset} binary bytes left")
            raw, offset = binary[offset: offset + size], offset + size
            values = _from_binary(raw, t, count)
        elif t.data is not None:
            values = _from_json(t, count)
        else:
            raise ApiError(422, f"inputs.{t.name}: neither data nor parameters.binary_data_size")
        tensors[t.name] = values
    if offset != len(binary):
        raise ApiError(400, f"{len(binary) - offset} binary bytes after the last input tensor")
    return req, tensors


def _from_binary(raw: bytes, t: V2Tensor, count: int) -> np.ndarray:
    if t.datatype == "BYTES":
        items = _unpack_bytes(raw, t.name)
        if len(items) != count:
            raise ApiError(422, f"inputs.{t.name}: {len(items)} BYTES elements for shape {t.shape}")
        return _decode_texts(items, t.name).reshape(t.shape)
    if t.datatype not in DTYPES:
        raise ApiError(422, f"inputs.{t.name}.datatype: {t.datatype} is not supported (FP32 or BYTES)")
    dtype = np.dtype(DTYPES[t.datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise ApiError(422, f"inputs.{t.name}: {len(raw)} bytes of {t.datatype} for shape {t.shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(t.shape)


def _decode_texts(items: list, name: str) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"inputs.{name}[{i}]: not valid UTF-8") from None
        if not isinstance(item, str):
            raise ApiError(422, f"inputs.{name}[{i}]: expected a string, got {type(item).__name__}")
        out[i] = item
    return out


def _from_json(t: V2Tensor, count: int) -> np.ndarray:
    flat = np.asarray(t.data, dtype=object).reshape(-1) if t.data else np.empty(0, dtype=object)
    if len(flat) != count:
        raise ApiError(422, f"inputs.{t.name}: {len(flat)} values for shape {t.shape}")
    if t.datatype == "BYTES":
        return _decode_texts(list(flat), t.name).reshape(t.shape)
    if t.datatype not in DTYPES:
        raise ApiError(422, f"inputs.{t.name}.datatype: {t.datatype} is not supported (FP32 or BYTES)")
    if any(isinstance(v, (bool, str)) or not isinstance(v, (int, float)) for v in flat):
        raise ApiError(422, f"inputs.{t.name}: {t.datatype} data must be numbers")
    dtype = np.dtype(DTYPES[t.datatype])
    limit = int(np.iinfo(dtype).max) if dtype.kind == "i" else float(np.finfo(dtype).max)  # Python numbers: exact
    big = next((i for i, v in enumerate(flat) if abs(v) > limit), None)
    if big is not None:
        raise ApiError(422, f"inputs.{t.name}.data[{big}]: beyond the range of {t.datatype} (|x| <= {limit:.4g})")
    return np.asarray(flat.astype(np.float64), dtype=dtype).reshape(t.shape)


OUTPUTS = ("probabilities", "label")


def check_outputs(req: V2Request) -> None:
    """Refuse unknown requested outputs before the model runs."""
    unknown = [o.name for o in req.outputs or [] if o.name not in OUTPUTS]
    if unknown:
        raise ApiError(422, f"outputs: unknown output {unknown[0]!r} (outputs: {', '.join(OUTPUTS)})")


def v2_response(req: V2Request, answer: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The V2 response body and headers; binary outputs when the request asked for them."""
    probs = np.asarray(answer["probabilities"], dtype=np.float32)
    label = np.asarray(answer["labels"], dtype=object)
    tensors = {"probabilities": ("FP32", probs), "label": ("BYTES", label)}
    wanted = [o.name for o in req.outputs] if req.outputs else list(tensors)
    unknown = [n for n in wanted if n not in tensors]
    if unknown:
        raise ApiError(422, f"outputs: unknown output {unknown[0]!r} (outputs: {', '.join(tensors)})")
    as_binary = {o.name: bool((o.parameters or {}).get("binary_data")) for o in req.outputs or []}
    default_binary = bool((req.parameters or {}).get("binary_data_output"))
    outputs, blobs = [], []
    for name in wanted:
        datatype, value = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if as_binary.get(name, default_binary):
            blob = value.astype("<f4").tobytes() if datatype == "FP32" else \
                b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in value.tolist())
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = value.reshape(-1).tolist()
            out["data"] = [round(x, 6) for x in flat] if datatype == "FP32" else flat
        outputs.append(out)
    doc = {"model_name": answer["model"], "model_version": answer["model_version"], "outputs": outputs}
    if req.id is not None:
        doc["id"] = req.id
    if answer.get("request_id"):
        doc["parameters"] = {"request_id": answer["request_id"]}  # feedback labels name it
    header = json.dumps(doc).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))}
