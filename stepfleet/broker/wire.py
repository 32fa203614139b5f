"""Decode whatever bytes a producer put in a message's short strings and header names.

RabbitMQ passes short strings (`message_id`, `user_id`'s neighbours, header names) on without
checking that they are UTF-8, and pamqp decodes them strictly: one invalid byte raises inside
aiormq's frame reader, which closes the whole connection, every lane's consumer with it, before
any handler sees the message; redelivered, it does the same again. Decoding invalid bytes as
U+FFFD instead lets the message reach the worker, which judges it like any other.
"""

from __future__ import annotations

import struct

from pamqp import common, decode

_REPLACE = "replace"


def short_str(value: bytes) -> tuple[int, str]:
    """pamqp's short string decoder, with invalid UTF-8 replaced instead of raised."""
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, value[1 : length + 1].decode("utf-8", _REPLACE)


def field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's field table decoder, with invalid UTF-8 in keys replaced instead of raised."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, common.FieldValue] = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", _REPLACE)
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def tolerate_invalid_utf8() -> None:
    """Install the lenient decoders for every frame this process reads (idempotent)."""
    decode.METHODS["shortstr"] = short_str
    decode.METHODS["table"] = field_table
    decode.TABLE_MAPPING[b"F"] = field_table
