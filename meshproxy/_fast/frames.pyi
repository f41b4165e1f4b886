"""Type stubs for the compiled frame codec (same API as meshproxy.codec.frames_py)."""

from collections.abc import Iterable, Iterator

Buffer = bytes | bytearray | memoryview

class Frame:
    type: int
    flags: int
    stream_id: int
    length: int
    def serialize_into(self, buf: bytearray) -> None: ...

class DataFrame(Frame):
    pad_length: int
    @property
    def data(self) -> memoryview: ...
    @property
    def padding(self) -> memoryview: ...
    @property
    def end_stream(self) -> bool: ...
    @property
    def flow_controlled_length(self) -> int: ...

class HeadersFrame(Frame):
    pad_length: int
    depends_on: int
    weight: int
    exclusive: bool
    @property
    def data(self) -> memoryview: ...
    @property
    def padding(self) -> memoryview: ...
    @property
    def end_stream(self) -> bool: ...
    @property
    def end_headers(self) -> bool: ...
    @property
    def priority(self) -> bool: ...

class PriorityFrame(Frame):
    depends_on: int
    weight: int
    exclusive: bool

class RstStreamFrame(Frame):
    error_code: int

class SettingsFrame(Frame):
    settings: list[tuple[int, int]]
    @property
    def ack(self) -> bool: ...

class PushPromiseFrame(Frame):
    pad_length: int
    promised_stream_id: int
    @property
    def data(self) -> memoryview: ...
    @property
    def padding(self) -> memoryview: ...
    @property
    def end_headers(self) -> bool: ...

class PingFrame(Frame):
    opaque_data: bytes
    @property
    def ack(self) -> bool: ...

class GoAwayFrame(Frame):
    last_stream_id: int
    error_code: int
    @property
    def additional_data(self) -> memoryview: ...

class WindowUpdateFrame(Frame):
    increment: int

class ContinuationFrame(Frame):
    @property
    def data(self) -> memoryview: ...
    @property
    def end_headers(self) -> bool: ...

class FrameParser(Iterator[Frame]):
    max_frame_size: int
    def __init__(self, max_frame_size: int = 16384) -> None: ...
    @property
    def buffered(self) -> int: ...
    @property
    def header_block_stream(self) -> int: ...
    def feed(self, data: Buffer) -> None: ...
    def __iter__(self) -> FrameParser: ...
    def __next__(self) -> Frame: ...

def write_frame_header(buf: bytearray, length: int, ftype: int, flags: int, stream_id: int) -> None: ...
def write_data(
    buf: bytearray, stream_id: int, data: Buffer, end_stream: bool = False, pad_length: int | None = None
) -> None: ...
def write_headers(
    buf: bytearray,
    stream_id: int,
    fragment: Buffer,
    end_stream: bool = False,
    end_headers: bool = True,
    pad_length: int | None = None,
    priority: tuple[int, int, bool] | None = None,
) -> None: ...
def write_priority(buf: bytearray, stream_id: int, depends_on: int, weight: int, exclusive: bool = False) -> None: ...
def write_rst_stream(buf: bytearray, stream_id: int, error_code: int) -> None: ...
def write_settings(buf: bytearray, settings: Iterable[tuple[int, int]] = (), ack: bool = False) -> None: ...
def write_push_promise(
    buf: bytearray,
    stream_id: int,
    promised_stream_id: int,
    fragment: Buffer,
    end_headers: bool = True,
    pad_length: int | None = None,
) -> None: ...
def write_ping(buf: bytearray, opaque_data: bytes, ack: bool = False) -> None: ...
def write_goaway(buf: bytearray, last_stream_id: int, error_code: int, additional_data: Buffer = b"") -> None: ...
def write_window_update(buf: bytearray, stream_id: int, increment: int) -> None: ...
def write_continuation(buf: bytearray, stream_id: int, fragment: Buffer, end_headers: bool = True) -> None: ...
def write_header_block(
    buf: bytearray,
    stream_id: int,
    block: Buffer,
    end_stream: bool = False,
    max_frame_size: int = 16384,
    priority: tuple[int, int, bool] | None = None,
) -> None: ...
