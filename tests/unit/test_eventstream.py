"""The AWS event-stream frames the SageMaker response stream sends decode with botocore's own parser."""

from botocore.eventstream import EventStreamBuffer

from controller.api import eventstream


def test_payload_parts_decode_with_botocore_in_any_split():
    parts = [b'{"token": {"id": 1, "text": " a"}, "index": 0}\n', b"", "é ünïcode\n".encode()]
    wire = b"".join(eventstream.payload_part(p) for p in parts)
    for step in (1, 7, len(wire)):  # delivered in pieces of any size
        buf = EventStreamBuffer()
        got = []
        for i in range(0, len(wire), step):
            buf.add_data(wire[i:i + step])
            got.extend(buf)
        assert [m.payload for m in got] == parts
        assert all(m.headers == {":event-type": "PayloadPart", ":content-type": "application/octet-stream",
                                 ":message-type": "event"} for m in got)
