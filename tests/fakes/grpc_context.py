"""A stand-in for ``grpc.aio.ServicerContext`` in an in-process call of a service method: ``abort`` raises
:class:`Aborted` with what a client would receive (code, details, trailing metadata)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[tuple[str, str]]) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = dict(trailing_metadata)


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str]] = ()) -> None:
        raise Aborted(code, details, trailing_metadata)
