"""The messages between processes survive pickling whole: every field, in its place."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from photoscand import protocol

MESSAGES = [
    protocol.ThumbnailSettings((256, 1440), "webp", 75, "/thumbs", 50_000_000, "magick", 256, 5),
    protocol.PhotoMetadata(format="jpeg", width=4000, height=3000, gps_lat=-33.5, exif='{"a": 1}'),
    protocol.FileIdentity(1234, 5_000_000_000, 2049, 77),
    protocol.MetadataRequest(3, b"/photos/caf\xc3\xa9.jpg", None),
    protocol.Parsed(
        protocol.FileIdentity(1234, 5_000_000_000, 2049, 77), protocol.PhotoMetadata(format="png")
    ),
    protocol.MetadataAnswer(3, protocol.NotAPhoto("a text file"), 0.002, "libpng warning"),
    protocol.NotAPhoto("a text file"),
    protocol.Unreadable("EACCES", "permission denied"),
    protocol.ConversionJob(9, b"/photos/a.jpg", "jpeg", 6, False),
    protocol.ThumbnailFile(256, "/thumbs/9-256.jpg", 256, 171),
    protocol.Converted(
        9, "ab" * 32, (protocol.ThumbnailFile(256, "/t", 256, 171),), 0.25, {"decode": 0.2}
    ),
    protocol.ConversionFailed(9, "corrupt", "bad Huffman code", 0.1),
    protocol.WorkerReady(4321),
    protocol.SweepDone(7),
]


@pytest.mark.parametrize("value", MESSAGES, ids=lambda v: type(v).__name__)
def test_a_message_pickles_to_an_equal_value_of_its_class(value: object) -> None:
    back = pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(back) is type(value) and back == value
    for item in dataclasses.fields(value):  # type: ignore[arg-type]
        assert getattr(back, item.name) == getattr(value, item.name)


def test_every_message_class_is_in_the_round_trip() -> None:
    classes = {
        obj
        for obj in vars(protocol).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj)
    }
    assert classes == {type(v) for v in MESSAGES}
