"""Wire messages as JSON objects for the REST API: field names as in the proto, 64-bit integers as JSON numbers
(json_format gives strings), enums as their short lower-case names (``RUN_STATUS_RUNNING`` -> ``running``)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def _enum_prefix(enum: Any) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def _value(field: Any, value: Any) -> Any:  # a FieldDescriptor (python or upb)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        number = enum.values_by_number.get(value)
        if number is None:
            return int(value)
        return number.name.removeprefix(_enum_prefix(enum)).lower()
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def message_dict(msg: Message) -> dict[str, Any]:
    """Every field of ``msg`` (unset optional ones as null)."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(inner, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        elif field.has_presence and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def run_dict(info: Message) -> dict[str, Any]:
    """A RunInfo with its Result parsed: ``result`` (an object, or null while the run goes on)."""
    out = message_dict(info)
    raw = out.pop("result_json", "")
    out["result"] = json.loads(raw) if raw else None
    return out
