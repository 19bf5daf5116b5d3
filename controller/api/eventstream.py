"""AWS event-stream framing (application/vnd.amazon.eventstream), the body SageMaker's
InvokeEndpointWithResponseStream answers with and botocore's EventStream decodes.

One message:
    prelude   total length (uint32 BE, whole message) | headers length (uint32 BE) | CRC32 of those 8 bytes
    headers   per header: name length (uint8) | name | type (uint8, 7 = string) | value length (uint16 BE) | value
    payload   the bytes
    CRC32 of everything before it (uint32 BE)
"""

from __future__ import annotations

import struct
import zlib

CONTENT_TYPE = "application/vnd.amazon.eventstream"
_STRING = 7


def _headers(headers: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        out += struct.pack(">B", len(n)) + n + struct.pack(">BH", _STRING, len(v)) + v
    return bytes(out)


def message(headers: dict[str, str], payload: bytes) -> bytes:
    head = _headers(headers)
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack(">II", total, len(head))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + payload
    return body + struct.pack(">I", zlib.crc32(body))


def payload_part(data: bytes) -> bytes:
    """A PayloadPart event: boto3 yields {"PayloadPart": {"Bytes": data}}."""
    return message({":event-type": "PayloadPart", ":content-type": "application/octet-stream",
                    ":message-type": "event"}, data)

